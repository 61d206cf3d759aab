package server_test

import (
	"context"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// BenchmarkGateUncontended is the ordering cost every request pays when
// nothing overlaps it: register, wait, release.
func BenchmarkGateUncontended(b *testing.B) {
	var g server.OrderGate
	// A few long-running requests elsewhere, as on a busy export.
	for i := range 8 {
		g.Register(1<<40+uint64(i)<<20, 1<<40+uint64(i+1)<<20, true)
	}
	b.ReportAllocs()
	var off uint64
	for b.Loop() {
		s := g.Register(off, off+4096, true)
		s.Wait()
		g.Release(s)
		off = (off + 4096) % (1 << 30)
	}
}

// benchIO runs op over loopback against an in-process server: one request
// at a time ("qd1"), then from 16 goroutines sharing one connection, as a
// kernel client or fio with iodepth=16 would ("qd16").
func benchIO(b *testing.B, op func(ctx context.Context, c *nbd.Client, buf []byte, off uint64) error) {
	const size = 4096
	const span = 16 << 20
	for _, bc := range []struct {
		name  string
		depth int
	}{{"qd1", 1}, {"qd16", 16}} {
		b.Run(bc.name, func(b *testing.B) {
			inst := testserver.Start(b, testserver.Options{Size: span})
			c := inst.Dial(b, nil)
			ctx := context.Background()
			// Data everywhere, in the page cache: the server's own cost, not the disk's.
			chunk := make([]byte, 1<<20)
			for i := range chunk {
				chunk[i] = byte(i) | 1
			}
			for off := uint64(0); off < span; off += uint64(len(chunk)) {
				if err := c.Write(ctx, chunk, off, 0); err != nil {
					b.Fatal(err)
				}
			}
			var next atomic.Uint64
			b.SetBytes(size)
			b.ReportAllocs()
			if bc.depth == 1 {
				buf := make([]byte, size)
				for b.Loop() {
					if err := op(ctx, c, buf, next.Add(size)%span); err != nil {
						b.Fatal(err)
					}
				}
				return
			}
			// RunParallel starts this many goroutines per GOMAXPROCS.
			b.SetParallelism(max(1, bc.depth/runtime.GOMAXPROCS(0)))
			b.RunParallel(func(pb *testing.PB) {
				buf := make([]byte, size)
				for pb.Next() {
					if err := op(ctx, c, buf, next.Add(size)%span); err != nil {
						b.Error(err)
						return
					}
				}
			})
		})
	}
}

func BenchmarkServerRead4K(b *testing.B) {
	benchIO(b, func(ctx context.Context, c *nbd.Client, buf []byte, off uint64) error {
		return c.Read(ctx, buf, off, 0)
	})
}

func BenchmarkServerWrite4K(b *testing.B) {
	benchIO(b, func(ctx context.Context, c *nbd.Client, buf []byte, off uint64) error {
		return c.Write(ctx, buf, off, 0)
	})
}
