package mirror

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flexnbd/flexnbd/nbd"
)

// Convergence bounds: a migration never loops forever.
const (
	// maxCopyPasses is the most background passes before active
	// mirroring takes over, however the dirty count moves.
	maxCopyPasses = 8
	// maxActivePasses is the most passes in active mode before the
	// freeze, however much is left (the freeze copies the rest).
	maxActivePasses = 3
	// shrinkFactor: a pass that leaves more than this share of what the
	// previous one left is not converging.
	shrinkFactor = 0.75
	// maxWindow bounds the stretch one worker takes from the dirty map;
	// within it holes are found with one query.
	maxWindow = 64 << 20
	// maxPreFlushes bounds the flushes sent before a freeze.
	maxPreFlushes = 4
	// confirmTries bounds the attempts to confirm a hand-off whose DISC
	// was sent but not seen arriving.
	confirmTries = 3
)

// attempt is one connection's try at the whole migration.
type attempt struct {
	m   *Mirror
	c   *nbd.Client
	ctx context.Context // ends with the attempt
	// what the destination offers
	zeroes      bool
	blockStatus bool
	// file, when set, is where WRITE payloads are taken from by the
	// kernel (sendfile) instead of being read into a buffer.
	file *os.File
	// fail ends the attempt with an error (from the write hook too).
	fail context.CancelCauseFunc
	// rate is the copy speed measured over the passes, in bytes/s.
	rate float64
	// unflushed counts bytes written since the last background flush;
	// flushKick wakes the flusher once it passes flushEvery.
	unflushed atomic.Uint64
	flushKick chan struct{}
}

// flushEvery is how much the copy writes between background FLUSHes. The
// destination writes its data back to disk while the copy goes on, so the
// flush before the freeze, and the one inside it, find little left to do:
// without them the pre-freeze flush of a 1 GiB copy took as long as the
// copy itself.
var flushEvery uint64 = 128 << 20

// errFreezePutOff: the freeze could not stop the clients in time.
var errFreezePutOff = errors.New("mirror: clients did not stop in time; freeze put off")

// run copies everything, converges, freezes and hands off. It returns nil
// once the destination has taken over.
func (m *Mirror) attempt(parent context.Context, c *nbd.Client) error {
	ctx, fail := context.WithCancelCause(parent)
	defer fail(nil)
	a := &attempt{
		m:           m,
		c:           c,
		ctx:         ctx,
		zeroes:      c.Flags()&nbd.FlagSendWriteZeroes != 0,
		blockStatus: c.Session().AllocationContext != 0,
		fail:        fail,
		flushKick:   make(chan struct{}, 1),
	}
	if fe, ok := m.cfg.Export.(FileExport); ok && !m.cfg.NoSendFile && c.CanSendFile() {
		a.file = fe.SourceFile()
	}
	go a.flusher(ctx)
	defer func() {
		m.fwd.Store(nil)
		// Never a DISC here: after a FLUSH the destination would take
		// it for a completed migration. The hand-off sends its own.
		c.Abort()
	}()
	m.log.Info().Str("target", m.cfg.Target).Bool("write_zeroes", a.zeroes).
		Bool("block_status", a.blockStatus).Bool("sendfile", a.file != nil).Bool("oldstyle", c.Session().Oldstyle).Msg("migration attempt started")

	m.dirty.markAll()
	m.setMode(ModeCopy)
	var prevLeft uint64
	activePasses := 0
	for pass := 1; ; pass++ {
		m.pass.Store(int32(pass))
		start, sent := time.Now(), m.sent.Load()
		if err := a.pass(ctx, pass == 1, true); err != nil {
			return err
		}
		a.measure(time.Since(start), m.sent.Load()-sent)
		left := m.dirty.dirtyBytes()
		mode := m.Mode()
		if mode == ModeActive {
			activePasses++
		}
		m.log.Info().Int("pass", pass).Uint64("dirty_bytes", left).Str("mode", mode.String()).
			Float64("rate", a.rate).Msg("pass complete")
		if left <= a.freezeThreshold() || activePasses >= maxActivePasses {
			err := a.freeze(ctx)
			if err == nil {
				return nil
			}
			if !errors.Is(err, errFreezePutOff) {
				return err
			}
			m.log.Info().Err(err).Msg("continuing with another pass")
			continue
		}
		if mode == ModeCopy && (pass >= maxCopyPasses ||
			pass >= 2 && float64(left) > float64(prevLeft)*shrinkFactor) {
			m.log.Info().Int("pass", pass).Uint64("dirty_bytes", left).Uint64("previous", prevLeft).
				Msg("passes are not converging; switching to active mirroring")
			m.fwd.Store(a)
			m.setMode(ModeActive)
		}
		prevLeft = left
	}
}

// pass copies every dirty block once, from the start of the export, with
// Depth workers each sending one WRITE at a time.
func (a *attempt) pass(parent context.Context, first, limited bool) error {
	m := a.m
	m.dirty.rewind()
	ctx, cancel := context.WithCancelCause(parent)
	defer cancel(nil)
	window := min(max(m.cfg.Export.Size()/uint64(m.cfg.Depth*4), m.cfg.ChunkSize), maxWindow)
	window = max(window&^(m.cfg.Granularity-1), m.cfg.Granularity)
	var wg sync.WaitGroup
	for range m.cfg.Depth {
		wg.Go(func() {
			for ctx.Err() == nil {
				e, ok := m.dirty.take(window)
				if !ok {
					return
				}
				err := a.copyExtent(ctx, e.extent, &e.done, first, limited)
				m.dirty.landed(e, err == nil)
				if err != nil {
					cancel(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return nil
}

// measure folds a pass's speed into the estimate the freeze is planned
// with. Passes that sent little say little about the link.
func (a *attempt) measure(d time.Duration, sent uint64) {
	if sent < 4*a.m.cfg.ChunkSize || d <= 0 {
		return
	}
	r := float64(sent) / d.Seconds()
	if a.rate == 0 {
		a.rate = r
	} else {
		a.rate = (a.rate + r) / 2
	}
}

// freezeThreshold is how much may be left for the freeze to copy: what
// the link moves in FreezeTarget, at least a few blocks, at most 64 MiB.
func (a *attempt) freezeThreshold() uint64 {
	t := uint64(a.rate * a.m.cfg.FreezeTarget.Seconds())
	return min(max(t, 4*a.m.cfg.Granularity), 64<<20)
}

// flusher sends a FLUSH whenever flushEvery bytes were written since the
// last one, until the attempt ends.
func (a *attempt) flusher(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.flushKick:
		}
		a.unflushed.Store(0)
		if err := a.flush(ctx); err != nil {
			a.fail(err)
			return
		}
	}
}

// flush asks the destination to make everything durable.
func (a *attempt) flush(ctx context.Context) error {
	rctx, cancel := context.WithTimeout(ctx, a.m.cfg.RequestTimeout)
	defer cancel()
	if err := a.c.Flush(rctx); err != nil {
		return fmt.Errorf("mirror: flush destination: %w", err)
	}
	return nil
}

// preFlush flushes the destination while clients still run, so that the
// flush inside the freeze has little left to write out. Writes keep
// arriving while it runs (forwarded ones in active mode), and a flush
// costs in proportion to what it finds, so it repeats until one is done
// within the freeze target: each finds what arrived during the last.
// It returns how many it sent.
func (a *attempt) preFlush(ctx context.Context) (int, error) {
	n := 0
	for n < maxPreFlushes {
		start := time.Now()
		n++
		if err := a.flush(ctx); err != nil {
			return n, err
		}
		if time.Since(start) <= a.m.cfg.FreezeTarget {
			break
		}
	}
	return n, nil
}

// freeze holds the clients, copies what is left, has the destination
// flush, and hands off. Any failure before the hand-off resumes the held
// requests on the source: nothing is lost and no client sees an error.
func (a *attempt) freeze(ctx context.Context) error {
	m := a.m
	preFlushes, err := a.preFlush(ctx)
	if err != nil {
		return err
	}
	if left := m.dirty.dirtyBytes(); left > a.freezeThreshold() && m.Mode() != ModeActive {
		return fmt.Errorf("%w: %d bytes became dirty meanwhile", errFreezePutOff, left)
	}
	// The freeze starts now: from here new client requests wait.
	start := time.Now()
	hctx, cancel := context.WithTimeout(ctx, m.cfg.HoldTimeout)
	err = m.cfg.Export.Hold(hctx)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return context.Cause(ctx)
		}
		return fmt.Errorf("%w: %w", errFreezePutOff, err)
	}
	held := time.Now()
	prevMode := m.Mode()
	m.setMode(ModeFreeze)
	handedOff := false
	defer func() {
		if !handedOff {
			m.cfg.Export.Resume()
			m.setMode(prevMode)
			m.log.Warn().Dur("held", time.Since(start)).Msg("freeze failed; clients resumed on the source")
		}
	}()

	left := m.dirty.dirtyBytes()
	if err := a.pass(ctx, false, false); err != nil {
		return err
	}
	copied := time.Now()
	// Nothing runs on the export now, so nothing can have become dirty.
	if n := m.dirty.dirtyBytes(); n != 0 {
		return fmt.Errorf("mirror: %d bytes dirty after the final copy", n)
	}
	m.fwd.Store(nil)
	if err := a.flush(ctx); err != nil {
		return err
	}
	flushed := time.Now()
	// The destination holds everything, durably: from here on the
	// hand-off goes through, whatever happens to the DISC.
	if m.cfg.Finish == FinishUnlink {
		if err := m.cfg.Unlink(); err != nil {
			m.log.Error().Err(err).Msg("cannot remove the source file; the destination has taken over regardless")
		} else {
			m.log.Info().Msg("source file removed")
		}
	}
	a.handOff(ctx)
	handedOff = true
	if m.cfg.Finish == FinishNothing {
		m.cfg.Export.Resume()
	} else {
		m.cfg.Export.DropHeld()
	}
	freeze := time.Since(start)
	m.lastFreeze.Store(int64(freeze))
	m.log.Info().Dur("freeze", freeze).Uint64("final_bytes", left).Int("pre_flushes", preFlushes).
		Dur("hold_wait", held.Sub(start)).Dur("final_copy", copied.Sub(held)).
		Dur("final_flush", flushed.Sub(copied)).Dur("disc", time.Since(flushed)).
		Msg("hand-off complete")
	return nil
}

// handOff sends DISC and makes sure the destination saw it: a destination
// that misses it keeps waiting for a source that will not come back. When
// the DISC is not seen arriving, a new connection repeats FLUSH and DISC
// (the destination has every byte already), or learns that the
// destination completed. If none of that works the hand-off still stands:
// going back to serving from the source could leave two diverging copies,
// while the destination's data is complete and durable.
func (a *attempt) handOff(ctx context.Context) {
	m := a.m
	dctx, cancel := context.WithTimeout(ctx, m.cfg.RequestTimeout)
	err := a.c.Disconnect(dctx)
	cancel()
	for try := 1; err != nil && try <= confirmTries && ctx.Err() == nil; try++ {
		m.log.Warn().Err(err).Int("try", try).Msg("destination did not confirm the hand-off; confirming again")
		if sleep(ctx, m.cfg.RetryMin) != nil {
			break
		}
		var c *nbd.Client
		c, err = m.connect(ctx)
		if errors.Is(err, errAlreadyComplete) {
			err = nil
			break
		}
		if err != nil {
			continue
		}
		dctx, cancel := context.WithTimeout(ctx, m.cfg.RequestTimeout)
		if err = c.Flush(dctx); err == nil {
			err = c.Disconnect(dctx)
		} else {
			c.Abort()
		}
		cancel()
	}
	if err != nil {
		m.log.Error().Err(err).Msg("hand-off not confirmed by the destination; its copy is complete and flushed")
	}
}
