package mirror

import (
	"context"
	"sync"
	"time"
)

// limiter paces the bytes sent to a rate that can change at any time. Each
// send books its bytes on a virtual clock that advances by n/rate, and
// waits until the clock says the bytes before it have had their time; so
// the average holds to the rate whatever the size of the sends, and a
// burst is never more than one send.
type limiter struct {
	mu   sync.Mutex
	rate uint64    // bytes per second; 0 means no limit
	next time.Time // when the bytes booked so far have been paid for
	// changed is closed and replaced when the rate changes, so that a
	// wait booked at the old rate is recomputed.
	changed chan struct{}
}

func newLimiter(rate uint64) *limiter {
	return &limiter{rate: rate, changed: make(chan struct{})}
}

// setRate changes the limit; 0 removes it.
func (l *limiter) setRate(rate uint64) {
	l.mu.Lock()
	l.rate = rate
	l.next = time.Time{}
	close(l.changed)
	l.changed = make(chan struct{})
	l.mu.Unlock()
}

func (l *limiter) limit() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.rate
}

// wait returns once n more bytes may be sent, or when ctx ends.
func (l *limiter) wait(ctx context.Context, n uint64) error {
	for {
		l.mu.Lock()
		if l.rate == 0 {
			l.mu.Unlock()
			return ctx.Err()
		}
		now := time.Now()
		start := l.next
		if start.Before(now) {
			start = now
		}
		l.next = start.Add(time.Duration(float64(n) / float64(l.rate) * float64(time.Second)))
		changed := l.changed
		l.mu.Unlock()
		d := start.Sub(now)
		if d <= 0 {
			return nil
		}
		t := time.NewTimer(d)
		select {
		case <-t.C:
			return nil
		case <-changed:
			t.Stop()
			// Booked at the old rate: book again at the new one.
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
}
