package proxy

import (
	"math/bits"
	"sync"
)

// Payload buffers come from pools by power-of-two size, 4 KiB to 32 MiB,
// so a steady stream of requests does not churn the garbage collector.
const (
	minBufShift = 12
	maxBufShift = 25
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// getBuf returns a buffer of n bytes (n at most 32 MiB).
func getBuf(n int) []byte {
	k := bufClass(n)
	if p, ok := bufPools[k].Get().(*[]byte); ok {
		return (*p)[:n]
	}
	b := make([]byte, 1<<(k+minBufShift))
	return b[:n]
}

// putBuf recycles a buffer from getBuf; nothing may use it afterwards.
func putBuf(b []byte) {
	if b == nil {
		return
	}
	b = b[:cap(b)]
	k := bufClass(len(b))
	if 1<<(k+minBufShift) != len(b) {
		return // not one of ours
	}
	bufPools[k].Put(&b)
}
