//go:build !race

package server_test

import (
	"context"
	"testing"

	"github.com/flexnbd/flexnbd/internal/testserver"
)

// TestSteadyStateAllocatesNothing pins the zero-allocation request path of
// the server and of our client: a 4 KiB read or write, over a sparse
// export (extent lookups included), allocates nothing once the pools are
// warm. The race detector empties sync.Pools at random, hence the build
// tag; make test runs this file in a separate pass without -race.
func TestSteadyStateAllocatesNothing(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{Size: 16 << 20})
	c := inst.Dial(t, nil)
	ctx := context.Background()
	buf := make([]byte, 4096)
	for i := range buf {
		buf[i] = byte(i)
	}
	ops := []struct {
		name string
		op   func() error
	}{
		{"write", func() error { return c.Write(ctx, buf, 8192, 0) }},
		{"read data", func() error { return c.Read(ctx, buf, 8192, 0) }},
		{"read hole", func() error { return c.Read(ctx, buf, 1<<20, 0) }},
	}
	for _, tt := range ops {
		t.Run(tt.name, func(t *testing.T) {
			for i := 0; i < 100; i++ { // warm the pools
				if err := tt.op(); err != nil {
					t.Fatal(err)
				}
			}
			allocs := testing.AllocsPerRun(500, func() {
				if err := tt.op(); err != nil {
					t.Fatal(err)
				}
			})
			// A stray allocation from the runtime (a goroutine stack,
			// a timer) may land in the window now and then.
			if allocs > 0.1 {
				t.Fatalf("%.2f allocations per request, want 0", allocs)
			}
		})
	}
}
