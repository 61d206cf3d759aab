package mirror

import (
	"sync"
	"time"
)

// Mode is how the migration copies at the moment.
type Mode int32

const (
	// ModeCopy: passes over the dirty map while clients write freely.
	ModeCopy Mode = iota
	// ModeActive: client writes also go to the destination before they
	// are acknowledged, because the passes stopped shrinking.
	ModeActive
	// ModeFreeze: clients are held while the rest is copied and handed
	// off.
	ModeFreeze
	// ModeRetry: an attempt failed; the next one starts after a backoff.
	ModeRetry
)

var modeNames = [...]string{ModeCopy: "copy", ModeActive: "active", ModeFreeze: "freeze", ModeRetry: "retry"}

func (m Mode) String() string {
	if int(m) < len(modeNames) {
		return modeNames[m]
	}
	return "unknown"
}

// Status is a migration's progress.
type Status struct {
	Target   string
	Duration time.Duration
	// BytesSent counts the data the destination acknowledged, and Speed
	// is its recent rate in bytes per second.
	BytesSent uint64
	Speed     uint64
	// BytesLeft is what is still to be looked at: dirty blocks, and in
	// the first pass everything not yet reached, holes included.
	BytesLeft   uint64
	SecondsLeft uint64
	// SpeedLimit is in bytes per second; 0 is no limit.
	SpeedLimit uint64
	Pass       int
	Mode       Mode
	Attempts   int
	// LastFreeze is how long the clients were held, once a freeze ended.
	LastFreeze time.Duration
	// Done is set once the migration has ended; Err then says how.
	Done bool
	Err  error
}

// Status reports the migration's progress. It never blocks on the copy.
func (m *Mirror) Status() Status {
	left := m.dirty.leftBytes()
	speed, settleRate := m.meter.rates()
	st := Status{
		Target:     m.cfg.Target,
		Duration:   time.Since(m.started),
		BytesSent:  m.sent.Load(),
		Speed:      uint64(speed),
		BytesLeft:  left,
		SpeedLimit: m.lim.limit(),
		Pass:       int(m.pass.Load()),
		Mode:       m.Mode(),
		Attempts:   int(m.attempts.Load()),
		LastFreeze: time.Duration(m.lastFreeze.Load()),
	}
	if settleRate > 0 {
		st.SecondsLeft = uint64(float64(left)/settleRate + 0.5)
	}
	select {
	case <-m.done:
		st.Done, st.Err = true, m.err
		st.BytesLeft, st.SecondsLeft = 0, 0
	default:
	}
	return st
}

// meter samples the counters twice a second and keeps smoothed rates.
type meter struct {
	mu                 sync.Mutex
	speed, settleSpeed float64
}

const meterTick = 500 * time.Millisecond

func (mt *meter) start(m *Mirror) (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(meterTick)
		defer t.Stop()
		last, lastSent, lastSettled := time.Now(), m.sent.Load(), m.settled.Load()
		for {
			select {
			case <-done:
				return
			case now := <-t.C:
				sent, settled := m.sent.Load(), m.settled.Load()
				secs := now.Sub(last).Seconds()
				mt.mu.Lock()
				mt.speed = smooth(mt.speed, float64(sent-lastSent)/secs)
				mt.settleSpeed = smooth(mt.settleSpeed, float64(settled-lastSettled)/secs)
				mt.mu.Unlock()
				last, lastSent, lastSettled = now, sent, settled
			}
		}
	}()
	return func() { close(done) }
}

// smooth weighs the newest sample as much as the history: rates follow a
// change within a couple of seconds without jumping at every tick.
func smooth(old, sample float64) float64 {
	if old == 0 {
		return sample
	}
	return (old + sample) / 2
}

func (mt *meter) rates() (speed, settle float64) {
	mt.mu.Lock()
	defer mt.mu.Unlock()
	return mt.speed, mt.settleSpeed
}
