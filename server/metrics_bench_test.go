package server_test

import (
	"testing"
	"time"

	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// BenchmarkMetricsObserve is what counting adds to each request with
// --metrics: the clock read and the counter updates, from every core at
// once as busy connections would.
func BenchmarkMetricsObserve(b *testing.B) {
	var m server.Metrics
	start := time.Now()
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			m.ObserveForTest(nbd.CmdRead, 4096, 0, time.Since(start)%(300*time.Microsecond))
		}
	})
}
