package server_test

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

type gateReq struct {
	off, end uint64
	write    bool
}

func (a gateReq) conflicts(b gateReq) bool {
	return (a.write || b.write) && a.off < b.end && b.off < a.end
}

func TestGateAdmission(t *testing.T) {
	w := func(off, end uint64) gateReq { return gateReq{off, end, true} }
	r := func(off, end uint64) gateReq { return gateReq{off, end, false} }
	tests := []struct {
		name     string
		earlier  []gateReq
		later    gateReq
		waitsFor []int // indexes into earlier
	}{
		{"write waits for an overlapping write", []gateReq{w(0, 10)}, w(5, 15), []int{0}},
		{"read waits for an overlapping write", []gateReq{w(0, 10)}, r(9, 10), []int{0}},
		{"write waits for an overlapping read", []gateReq{r(0, 10)}, w(0, 1), []int{0}},
		{"reads do not wait for reads", []gateReq{r(0, 10)}, r(0, 10), nil},
		{"adjacent ranges do not conflict", []gateReq{w(0, 10)}, w(10, 20), nil},
		{"disjoint ranges do not conflict", []gateReq{w(0, 10)}, r(100, 200), nil},
		{"waits for every conflicting request", []gateReq{w(0, 10), r(20, 30), w(5, 25)}, w(0, 30), []int{0, 1, 2}},
		{"a read waits only for the writes", []gateReq{r(0, 100), w(50, 60), r(0, 100)}, r(55, 56), []int{1}},
		{"a write at the top of the range", []gateReq{w(1<<63, 1<<64-1)}, w(1<<64-2, 1<<64-1), []int{0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var g server.OrderGate
			var spans []server.GateSpan
			for _, e := range tt.earlier {
				spans = append(spans, g.Register(e.off, e.end, e.write))
			}
			require.True(t, spans[0].Ready(), "the oldest request never waits")
			later := g.Register(tt.later.off, tt.later.end, tt.later.write)
			require.Equal(t, len(tt.waitsFor) == 0, later.Ready())

			admitted := make(chan struct{})
			go func() {
				later.Wait()
				close(admitted)
			}()
			isDep := make([]bool, len(spans))
			for _, i := range tt.waitsFor {
				isDep[i] = true
			}
			// Releasing what it does not depend on must not admit it; it is
			// admitted when the last request it depends on goes.
			for i, s := range spans {
				if !isDep[i] {
					g.Release(s)
				}
			}
			for k, i := range tt.waitsFor {
				select {
				case <-admitted:
					t.Fatalf("admitted with %d of its %d earlier conflicts still running", len(tt.waitsFor)-k, len(tt.waitsFor))
				case <-time.After(20 * time.Millisecond):
				}
				g.Release(spans[i])
			}
			select {
			case <-admitted:
			case <-time.After(10 * time.Second):
				t.Fatal("not admitted after every earlier conflict was released")
			}
			g.Release(later)
			assert.Zero(t, g.Pending())
		})
	}
}

// A long random run against a model of the rules, releasing requests in
// every order the server could, checks that recycled spans carry nothing
// over from their previous use.
func TestGateAgainstModel(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	var g server.OrderGate
	type active struct {
		req  gateReq
		span server.GateSpan
		deps map[int]bool // ids of earlier conflicting requests still registered
	}
	live := map[int]*active{}
	order := []int{} // live ids in registration order
	for id := 0; id < 5000; id++ {
		if len(live) > 0 && (rng.IntN(2) == 0 || len(live) > 12) {
			// Release a request that could be running: one whose earlier
			// conflicts are all gone.
			var runnable []int
			for _, i := range order {
				if len(live[i].deps) == 0 {
					runnable = append(runnable, i)
				}
			}
			require.NotEmpty(t, runnable, "deadlock: nothing can run")
			victim := runnable[rng.IntN(len(runnable))]
			a := live[victim]
			waited := make(chan struct{})
			go func() { a.span.Wait(); close(waited) }()
			select {
			case <-waited:
			case <-time.After(10 * time.Second):
				t.Fatalf("request %d still waits although its earlier conflicts are gone", victim)
			}
			g.Release(a.span)
			delete(live, victim)
			for i, o := range order {
				if o == victim {
					order = append(order[:i], order[i+1:]...)
					break
				}
			}
			for _, o := range live {
				delete(o.deps, victim)
			}
		}
		off := rng.Uint64N(64)
		req := gateReq{off, off + 1 + rng.Uint64N(16), rng.IntN(3) == 0}
		a := &active{req: req, deps: map[int]bool{}}
		for _, i := range order {
			if live[i].req.conflicts(req) {
				a.deps[i] = true
			}
		}
		a.span = g.Register(req.off, req.end, req.write)
		require.Equal(t, len(a.deps) == 0, a.span.Ready(), "request %d %+v", id, req)
		live[id] = a
		order = append(order, id)
		require.Equal(t, len(live), g.Pending())
	}
}

// Requests pipelined on one connection, with overlapping ranges, mixed
// sizes (some run on the reader, some on goroutines) and every kind of
// change, must take effect in the order they were sent: each read returns
// exactly what a sequential execution would have produced at its place.
func TestPipelinedRequestsTakeEffectInArrivalOrder(t *testing.T) {
	const region = 1 << 20
	const nOps = 400
	rng := rand.New(rand.NewPCG(3, 4))
	inst := testserver.Start(t, testserver.Options{})
	ops := make([]pipelineOp, nOps)
	for i := range ops {
		ops[i] = randomOp(rng, region, uint64(i))
	}
	results, err := runPipeline(dialRaw(t, inst.Addr), ops)
	require.NoError(t, err)

	model := make([]byte, region)
	for i, op := range ops {
		switch op.req.Type {
		case nbd.CmdWrite:
			copy(model[op.req.Offset:], op.payload)
		case nbd.CmdTrim, nbd.CmdWriteZeroes:
			clear(model[op.req.Offset : op.req.Offset+uint64(op.req.Length)])
		case nbd.CmdRead:
			want := model[op.req.Offset : op.req.Offset+uint64(op.req.Length)]
			if !bytes.Equal(want, results[i]) {
				t.Fatalf("request %d (read [%d,+%d)) saw data out of arrival order; first difference at +%d",
					i, op.req.Offset, op.req.Length, firstDiff(want, results[i]))
			}
		}
	}
	assert.Zero(t, inst.Server.GatePending())
}

type pipelineOp struct {
	req     nbd.Request
	payload []byte
}

func randomOp(rng *rand.Rand, region uint64, seed uint64) pipelineOp {
	length := 1 + rng.Uint64N(8192)
	if rng.IntN(4) == 0 {
		length = 1 + rng.Uint64N(300<<10) // past the inline limit
	}
	length = min(length, region)
	off := rng.Uint64N(region - length + 1)
	req := nbd.Request{Offset: off, Length: uint32(length)}
	var payload []byte
	switch k := rng.IntN(20); {
	case k < 8:
		req.Type = nbd.CmdWrite
		payload = pattern(seed, int(length))
		if k == 0 {
			req.Flags = nbd.CmdFlagFUA
		}
	case k < 16:
		req.Type = nbd.CmdRead
	case k < 17:
		req.Type = nbd.CmdTrim
	case k < 19:
		req.Type = nbd.CmdWriteZeroes
		if k == 18 {
			req.Flags = nbd.CmdFlagNoHole
		}
	default:
		req = nbd.Request{Type: nbd.CmdFlush}
	}
	return pipelineOp{req, payload}
}

// runPipeline sends every request without waiting for replies, reading
// replies on the side, and returns the data of each read (by index). An
// error reply is an error: every request in these tests is valid.
func runPipeline(rc *rawConn, ops []pipelineOp) ([][]byte, error) {
	sent := make(chan error, 1)
	go func() {
		w := bufio.NewWriterSize(rc.nc, 256<<10)
		for i, op := range ops {
			op.req.Cookie = uint64(i)
			w.Write(nbd.AppendRequest(nil, op.req))
			w.Write(op.payload)
		}
		sent <- w.Flush()
	}()
	results := make([][]byte, len(ops))
	if err := rc.nc.SetReadDeadline(time.Now().Add(30 * time.Second)); err != nil {
		return nil, err
	}
	for range ops {
		h, err := rc.reply()
		if err != nil {
			return nil, err
		}
		if h.Cookie >= uint64(len(ops)) || results[h.Cookie] != nil {
			return nil, fmt.Errorf("unexpected reply for cookie %d", h.Cookie)
		}
		op := ops[h.Cookie]
		if h.Errno != 0 {
			return nil, fmt.Errorf("request %d (%+v) failed: %w", h.Cookie, op.req, h.Errno)
		}
		results[h.Cookie] = []byte{}
		if op.req.Type == nbd.CmdRead {
			results[h.Cookie] = make([]byte, op.req.Length)
			if _, err := io.ReadFull(rc.br, results[h.Cookie]); err != nil {
				return nil, err
			}
		}
	}
	return results, <-sent
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
