package server

import (
	"math/bits"
	"sync"
	"sync/atomic"
)

// Data buffers come from power-of-two size classes between 4 KiB and the
// largest request, so a steady workload allocates nothing.
const (
	minBufShift = 12
	maxBufShift = 25 // 32 MiB, nbd.DefaultMaxPayload
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// getBuf returns a pooled buffer of at least n bytes (n at most
// 1<<maxBufShift). The pool holds the *[]byte itself, so that giving it
// back allocates nothing.
func getBuf(n int) *[]byte {
	c := bufClass(n)
	if p, ok := bufPools[c].Get().(*[]byte); ok {
		return p
	}
	b := make([]byte, 1<<(c+minBufShift))
	return &b
}

// putBuf recycles a buffer obtained from getBuf.
func putBuf(p *[]byte) {
	bufPools[bufClass(cap(*p))].Put(p)
}

// budget bounds the bytes of data buffers held, so that memory stays
// bounded whatever a client sends: one connection's, or the server's all
// together. acquire blocks until the bytes are free; a single request
// larger than the limit is let through alone rather than never.
//
// The server's budget keeps a reserve that only light holders may use: a
// few clients that never read their replies can fill the rest, but a
// client holding little still gets its next small request at once. (Many
// such clients are dropped by WriteTimeout; see doc.go.)
type budget struct {
	used    atomic.Int64
	limit   int64
	reserve int64 // of limit, for light holders only

	// Waiting goes through mu and cond; taking and returning bytes
	// without waiting are atomic, so connections do not contend on the
	// server's budget for every request.
	mu      sync.Mutex
	cond    sync.Cond
	waiters atomic.Int32
}

func newBudget(limit int) *budget {
	b := &budget{limit: int64(limit)}
	b.cond.L = &b.mu
	return b
}

// newServerBudget is a budget with a reserve for light holders.
func newServerBudget(limit int) *budget {
	b := newBudget(limit)
	b.reserve = int64(limit / reserveShare)
	return b
}

const (
	// reserveShare: the reserve is this fraction of the server's budget.
	reserveShare = 8
	// lightHolding is the most a connection may hold, the new request
	// included, and still draw on the reserve.
	lightHolding = 256 << 10
)

// tryAcquire takes n bytes if that needs no waiting: for a light holder
// up to the limit, for others up to the reserve.
func (b *budget) tryAcquire(n int, light bool) bool {
	ceiling := b.limit
	if !light {
		ceiling -= b.reserve
	}
	for {
		used := b.used.Load()
		if used != 0 && used+int64(n) > ceiling {
			return false
		}
		if b.used.CompareAndSwap(used, used+int64(n)) {
			return true
		}
	}
}

func (b *budget) acquire(n int, light bool) {
	if b.tryAcquire(n, light) {
		return
	}
	b.mu.Lock()
	// Counted before trying under mu: a release that comes after the
	// failed try sees the waiter and wakes it.
	b.waiters.Add(1)
	for !b.tryAcquire(n, light) {
		b.cond.Wait()
	}
	b.waiters.Add(-1)
	b.mu.Unlock()
}

func (b *budget) release(n int) {
	if n == 0 {
		return
	}
	b.used.Add(-int64(n))
	if b.waiters.Load() > 0 {
		b.mu.Lock()
		b.cond.Broadcast()
		b.mu.Unlock()
	}
}

// holding is what the budget has given out.
func (b *budget) holding() int { return int(b.used.Load()) }
