package server_test

import (
	"encoding/binary"
	"math/rand/v2"
	"testing"

	"github.com/flexnbd/flexnbd/server"
)

// gateOp is one step of a script for the ordering gate: register a range
// or release the registered request at index victim (modulo how many are
// registered).
type gateOp struct {
	release bool
	victim  int
	req     gateReq
}

// runGateScript drives a gate through ops and checks it against the rule
// itself, applied to every registered request in turn: a new request
// depends on exactly the registered ones it conflicts with, and is
// admitted exactly when all of those were released.
func runGateScript(t *testing.T, ops []gateOp) {
	t.Helper()
	type active struct {
		req  gateReq
		span server.GateSpan
		deps map[*active]bool // still registered
	}
	var g server.OrderGate
	var live []*active // registration order
	for step, op := range ops {
		if op.release {
			if len(live) == 0 {
				continue
			}
			i := op.victim % len(live)
			gone := live[i]
			g.Release(gone.span)
			live = append(live[:i], live[i+1:]...)
			for _, a := range live {
				delete(a.deps, gone)
				if got := a.span.Admitted(); got != (len(a.deps) == 0) {
					t.Fatalf("step %d: %+v admitted=%v with %d earlier conflicts registered", step, a.req, got, len(a.deps))
				}
			}
		} else {
			a := &active{req: op.req, deps: map[*active]bool{}}
			a.span = g.Register(op.req.off, op.req.end, op.req.write)
			for _, e := range live {
				want := e.req.conflicts(op.req)
				if want {
					a.deps[e] = true
				}
				if got := a.span.DependsOn(e.span); got != want {
					t.Fatalf("step %d: %+v depends on earlier %+v: %v, want %v", step, op.req, e.req, got, want)
				}
			}
			if a.span.Deps() != len(a.deps) || a.span.Ready() != (len(a.deps) == 0) {
				t.Fatalf("step %d: %+v waits for %d spans (ready %v), want %d",
					step, op.req, a.span.Deps(), a.span.Ready(), len(a.deps))
			}
			live = append(live, a)
		}
		if g.Pending() != len(live) {
			t.Fatalf("step %d: %d pending, want %d", step, g.Pending(), len(live))
		}
		if err := g.CheckTrees(); err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
	}
	for _, a := range live {
		g.Release(a.span)
	}
	if g.Pending() != 0 {
		t.Fatalf("%d pending after releasing everything", g.Pending())
	}
}

// TestGateDependenciesAgainstModel releases requests in random order,
// waiting or not, so the trees are rebalanced in every way and spans are
// recycled while hundreds are registered, over a small space where ranges
// overlap a lot and near the top of the offset range.
func TestGateDependenciesAgainstModel(t *testing.T) {
	for seed := range uint64(8) {
		rng := rand.New(rand.NewPCG(seed, 5))
		var ops []gateOp
		for range 6000 {
			if rng.IntN(100) < 45 {
				ops = append(ops, gateOp{release: true, victim: rng.IntN(1 << 20)})
				continue
			}
			off := rng.Uint64N(4096)
			if seed%2 == 1 {
				off = 1<<64 - 1 - rng.Uint64N(4096)
			}
			n := min(rng.Uint64N(64), 1<<64-1-off)
			ops = append(ops, gateOp{req: gateReq{off, off + n, rng.IntN(4) == 0}})
		}
		runGateScript(t, ops)
	}
}

// FuzzOrderGate reads a script three bytes per step: an opcode, then an
// offset and a length (or which request to release).
func FuzzOrderGate(f *testing.F) {
	f.Add([]byte{0, 0, 10, 2, 5, 10, 1, 0, 0, 0, 9, 1})
	f.Add([]byte{2, 0, 10, 2, 0, 10, 0, 3, 3, 1, 1, 0, 4, 0, 6, 8})
	f.Add([]byte{6, 250, 5, 6, 254, 1, 4, 200, 55, 1, 0, 0})
	seed := make([]byte, 0, 300)
	for i := range uint64(100) {
		seed = binary.BigEndian.AppendUint16(seed, uint16(i*0x9e37))
		seed = append(seed, byte(i*7))
	}
	f.Add(seed)
	f.Fuzz(func(t *testing.T, script []byte) {
		var ops []gateOp
		for ; len(script) >= 3; script = script[3:] {
			code, a, b := script[0], uint64(script[1]), uint64(script[2])
			if code&1 == 1 {
				ops = append(ops, gateOp{release: true, victim: int(a)})
				continue
			}
			off := a
			if code&4 != 0 { // where off+length meets the end of the offset range
				off = 1<<64 - 1 - a
			}
			n := min(b%32, 1<<64-1-off)
			ops = append(ops, gateOp{req: gateReq{off, off + n, code&2 != 0}})
		}
		runGateScript(t, ops)
	})
}
