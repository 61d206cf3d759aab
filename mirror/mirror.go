package mirror

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/nbd"
)

// ErrStopped ends a migration that Break or a cancelled context stopped.
var ErrStopped = errors.New("mirror stopped")

// ErrCompleted is returned by Break when the migration had already
// completed.
var ErrCompleted = errors.New("mirror completed")

// Mirror is one migration of an export to a destination. It runs on its
// own goroutines from Start until it completes or is stopped, retrying
// after every failure of the destination.
type Mirror struct {
	cfg   Config
	log   zerolog.Logger
	dirty *dirtyMap
	lim   *limiter

	cancel context.CancelFunc
	done   chan struct{}
	err    error // set before done is closed

	// progress, read by Status
	started    time.Time
	sent       atomic.Uint64 // payload bytes acknowledged by the destination
	settled    atomic.Uint64 // bytes copied or zeroed, holes included
	pass       atomic.Int32
	mode       atomic.Int32
	attempts   atomic.Int32
	lastFreeze atomic.Int64 // nanoseconds
	meter      meter

	// fwd is the attempt that forwards client writes (active mode).
	fwd atomic.Pointer[attempt]

	bufs     sync.Pool // *[]byte of ChunkSize
	zeroOnce sync.Once
	zeroes   []byte
}

// Start connects to the destination and, once it has greeted with an
// export of the same size, starts the migration in the background. A
// failure here is not retried: it wraps ErrConnect, ErrRejected,
// ErrNoGreeting or ErrSizeMismatch. The write hook is installed before
// anything is read, and removed when the migration ends.
func Start(ctx context.Context, cfg Config) (*Mirror, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	m := &Mirror{
		cfg:     cfg,
		log:     cfg.Logger.With().Str("component", "mirror").Str("target", cfg.Target).Logger(),
		dirty:   newDirtyMap(cfg.Export.Size(), cfg.Granularity),
		lim:     newLimiter(cfg.MaxBytesPerSecond),
		done:    make(chan struct{}),
		started: time.Now(),
	}
	c, err := m.connect(ctx)
	if err != nil {
		return nil, err
	}
	cfg.Export.SetWriteHook(m.onWrite)
	runCtx, cancel := context.WithCancel(context.Background())
	m.cancel = cancel
	go m.run(runCtx, c)
	m.log.Info().Uint64("size", cfg.Export.Size()).Uint64("max_bps", cfg.MaxBytesPerSecond).Msg("mirror started")
	return m, nil
}

// run is the attempt loop: after a failure it waits, with exponential
// backoff and jitter, reconnects and starts over, until success or stop.
func (m *Mirror) run(ctx context.Context, c *nbd.Client) {
	defer close(m.done)
	defer m.cfg.Export.SetWriteHook(nil)
	stopMeter := m.meter.start(m)
	defer stopMeter()
	delay := m.cfg.RetryMin
	for {
		m.attempts.Add(1)
		began := time.Now()
		err := m.attempt(ctx, c)
		switch {
		case err == nil:
			m.log.Info().Dur("duration", time.Since(m.started)).Int32("attempts", m.attempts.Load()).
				Dur("freeze", time.Duration(m.lastFreeze.Load())).Msg("migration complete")
			return
		case ctx.Err() != nil:
			m.err = ErrStopped
			m.log.Info().Msg("migration stopped")
			return
		}
		if time.Since(began) > m.cfg.RetryMax {
			delay = m.cfg.RetryMin // it was making progress
		}
		m.setMode(ModeRetry)
		for {
			wait := jitter(delay)
			m.log.Warn().Err(err).Int32("attempt", m.attempts.Load()).Dur("retry_in", wait).
				Msg("migration attempt failed; retrying")
			delay = min(2*delay, m.cfg.RetryMax)
			if sleep(ctx, wait) != nil {
				m.err = ErrStopped
				m.log.Info().Msg("migration stopped")
				return
			}
			c, err = m.connect(ctx)
			if err == nil {
				break
			}
		}
	}
}

// jitter spreads retries of many sources over a quarter of the delay.
func jitter(d time.Duration) time.Duration {
	return d + time.Duration(rand.Int64N(int64(d)/4+1))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// onWrite is the export's write hook. In active mode a write that no copy
// in flight overlaps is sent to the destination before the client hears
// it is done, so client writes cannot outrun the copy; anything else is
// marked dirty for the next pass. A failed forward marks the range and
// fails the attempt; the client's write has succeeded regardless.
func (m *Mirror) onWrite(off, length uint64) {
	a := m.fwd.Load()
	if a == nil {
		m.dirty.mark(off, length)
		return
	}
	if !m.dirty.markUnlessForwarded(off, length) {
		return
	}
	if err := a.copyExtent(a.ctx, extent{off, length}, nil, false, false); err != nil {
		m.dirty.mark(off, length)
		a.fail(err)
	}
}

// Done is closed when the migration has ended; Err then says how.
func (m *Mirror) Done() <-chan struct{} { return m.done }

// Err is nil after a successful migration and ErrStopped after Break. It
// must be called after Done is closed.
func (m *Mirror) Err() error { return m.err }

// Break stops the migration at whatever stage it is and returns once it
// has stopped: clients held by a freeze run on the source, and the source
// stays authoritative. It returns ErrCompleted if the hand-off came first.
func (m *Mirror) Break() error {
	select {
	case <-m.done:
		if m.err == nil {
			return ErrCompleted
		}
		return nil
	default:
	}
	m.cancel()
	<-m.done
	if m.err == nil {
		return ErrCompleted
	}
	return nil
}

// SetSpeedLimit changes the limit on what the copy sends, in bytes per
// second; 0 removes it.
func (m *Mirror) SetSpeedLimit(bytesPerSecond uint64) { m.lim.setRate(bytesPerSecond) }

func (m *Mirror) setMode(mode Mode) { m.mode.Store(int32(mode)) }

// Mode is the current way of copying.
func (m *Mirror) Mode() Mode { return Mode(m.mode.Load()) }
