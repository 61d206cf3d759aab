//go:build linux

package iobench

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// zeroPage is a shared, never-written page of zeroes to compare against.
var zeroPage [4096]byte

// isZero reports whether b is all zero bytes. Whole pages are compared
// with bytes.Equal against zeroPage (the runtime's memequal, which uses
// vector instructions and stops at the first difference); the tail is
// checked 8 bytes at a time, then byte by byte.
func isZero(b []byte) bool {
	for len(b) >= len(zeroPage) {
		if !bytes.Equal(b[:len(zeroPage)], zeroPage[:]) {
			return false
		}
		b = b[len(zeroPage):]
	}
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// isZeroWords is the alternative: 8 bytes at a time in plain Go, four
// words per iteration, without calling into memequal.
func isZeroWords(b []byte) bool {
	for len(b) >= 32 {
		if binary.LittleEndian.Uint64(b)|binary.LittleEndian.Uint64(b[8:])|
			binary.LittleEndian.Uint64(b[16:])|binary.LittleEndian.Uint64(b[24:]) != 0 {
			return false
		}
		b = b[32:]
	}
	for len(b) >= 8 {
		if binary.LittleEndian.Uint64(b) != 0 {
			return false
		}
		b = b[8:]
	}
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

var zeroCheckers = []struct {
	name string
	fn   func([]byte) bool
}{
	{"BytesEqualPage", isZero},
	{"Words8", isZeroWords},
}

func TestIsZero(t *testing.T) {
	for _, zc := range zeroCheckers {
		for _, n := range []int{0, 1, 7, 8, 9, 31, 32, 33, 4095, 4096, 4097, 8200, 1 << 20} {
			b := make([]byte, n)
			if !zc.fn(b) {
				t.Fatalf("%s: %d zero bytes judged non-zero", zc.name, n)
			}
			for i := 0; i < n; i += max(1, n/97) {
				b[i] = 0x80
				if zc.fn(b) {
					t.Fatalf("%s: len %d with byte %d set judged zero", zc.name, n, i)
				}
				b[i] = 0
			}
			if n > 0 {
				b[n-1] = 1
				if zc.fn(b) {
					t.Fatalf("%s: len %d with last byte set judged zero", zc.name, n)
				}
			}
		}
	}
}

var zeroSink bool

func BenchmarkIsZero(b *testing.B) {
	for _, zc := range zeroCheckers {
		for _, sc := range benchSizes {
			for _, pattern := range []string{"random", "zero"} {
				buf := make([]byte, sc.size)
				if pattern == "random" {
					fillRandom(buf, 7)
				}
				want := pattern == "zero"
				b.Run(zc.name+"/"+sc.name+"/"+pattern, func(b *testing.B) {
					b.SetBytes(int64(sc.size))
					for i := 0; i < b.N; i++ {
						zeroSink = zc.fn(buf)
					}
					if zeroSink != want {
						b.Fatalf("got %v, want %v", zeroSink, want)
					}
				})
			}
		}
	}
}
