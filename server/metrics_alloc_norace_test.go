//go:build !race

package server_test

import (
	"context"
	"testing"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/server"
)

// TestMetricsAllocatesNothing is TestSteadyStateAllocatesNothing with
// metrics on: counting requests and timing them must cost no allocation.
func TestMetricsAllocatesNothing(t *testing.T) {
	var m server.Metrics
	inst := testserver.Start(t, testserver.Options{Size: 16 << 20, Config: server.Config{Metrics: &m}})
	c := inst.Dial(t, nil)
	ctx := context.Background()
	buf := make([]byte, 4096)
	for i := 0; i < 100; i++ { // warm the pools
		if err := c.Write(ctx, buf, 8192, 0); err != nil {
			t.Fatal(err)
		}
	}
	allocs := testing.AllocsPerRun(500, func() {
		if err := c.Write(ctx, buf, 8192, 0); err != nil {
			t.Fatal(err)
		}
		if err := c.Read(ctx, buf, 8192, 0); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 0.1 {
		t.Fatalf("%.2f allocations per request pair, want 0", allocs)
	}
	// AllocsPerRun runs the function once more than asked, to warm up.
	want := map[string]uint64{"write": 100 + 501, "read": 501}
	for _, f := range m.Commands() {
		if n, ok := want[f.Command]; ok && f.Requests != n {
			t.Errorf("%s: %d requests counted, want %d", f.Command, f.Requests, n)
		}
	}
}
