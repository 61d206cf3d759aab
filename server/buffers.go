package server

import (
	"math/bits"
	"sync"
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

// budget bounds the bytes of data buffers one connection holds, so that
// memory stays bounded whatever a client sends. acquire blocks until the
// bytes are free; a single request larger than the limit is let through
// alone rather than never.
type budget struct {
	mu    sync.Mutex
	cond  sync.Cond
	used  int
	limit int
}

func newBudget(limit int) *budget {
	b := &budget{limit: limit}
	b.cond.L = &b.mu
	return b
}

func (b *budget) acquire(n int) {
	b.mu.Lock()
	for b.used > 0 && b.used+n > b.limit {
		b.cond.Wait()
	}
	b.used += n
	b.mu.Unlock()
}

// tryAcquire takes n bytes if that needs no waiting.
func (b *budget) tryAcquire(n int) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used > 0 && b.used+n > b.limit {
		return false
	}
	b.used += n
	return true
}

func (b *budget) release(n int) {
	if n == 0 {
		return
	}
	b.mu.Lock()
	b.used -= n
	b.mu.Unlock()
	b.cond.Broadcast()
}
