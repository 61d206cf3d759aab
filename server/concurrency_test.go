package server_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// Several connections pipeline overlapping writes and reads of the same
// blocks. Every write fills whole blocks with one tag (writer, sequence
// number), so what a read may see is constrained:
//   - a block never mixes two tags: no read sees half of a write, and two
//     overlapping writes never interleave;
//   - the reader's own writes arrived in the order it sent them, so if it
//     sees its own tag it is the latest it wrote there before the read;
//     zeroes only where it has not written yet;
//   - another writer's tags, as one reader sees them, never go backwards.
func TestConcurrentOverlappingClientsSeeConsistentBlocks(t *testing.T) {
	const (
		conns   = 4
		opsEach = 120
		block   = 24 << 10 // writes of 1-7 blocks straddle the inline limit
		blocks  = 32
		base    = 8 << 20
	)
	inst := testserver.Start(t, testserver.Options{})
	type result struct {
		ops  []pipelineOp
		data [][]byte
		err  error
	}
	results := make([]result, conns)
	var wg sync.WaitGroup
	for c := range conns {
		rc := dialRaw(t, inst.Addr)
		rng := rand.New(rand.NewPCG(uint64(c), 77))
		ops := make([]pipelineOp, opsEach)
		seq := uint32(0)
		for i := range ops {
			first := rng.Uint64N(blocks)
			if rng.IntN(2) == 0 {
				n := min(1+rng.Uint64N(7), blocks-first)
				seq++
				ops[i] = pipelineOp{
					req:     nbd.Request{Type: nbd.CmdWrite, Offset: base + first*block, Length: uint32(n * block)},
					payload: tagged(uint32(c+1), seq, int(n*block)),
				}
			} else {
				n := min(1+rng.Uint64N(8), blocks-first)
				ops[i] = pipelineOp{req: nbd.Request{Type: nbd.CmdRead, Offset: base + first*block, Length: uint32(n * block)}}
			}
		}
		results[c].ops = ops
		wg.Go(func() { results[c].data, results[c].err = runPipeline(rc, ops) })
	}
	wg.Wait()

	for c, res := range results {
		require.NoError(t, res.err, "connection %d", c)
		me := uint32(c + 1)
		ownLatest := make([]uint32, blocks)       // my last seq written to each block so far
		seen := make([][conns + 1]uint32, blocks) // highest seq of each writer seen per block
		for i, op := range res.ops {
			first := (op.req.Offset - base) / block
			n := uint64(op.req.Length) / block
			if op.req.Type == nbd.CmdWrite {
				_, s := untag(op.payload[:8])
				for b := first; b < first+n; b++ {
					ownLatest[b] = s
				}
				continue
			}
			for k := range n {
				b := first + k
				blk := res.data[i][k*block : (k+1)*block]
				if !uniform(blk) {
					t.Fatalf("conn %d op %d: block %d mixes writes (torn)", c, i, b)
				}
				who, s := untag(blk[:8])
				switch {
				case who == 0 && ownLatest[b] != 0:
					t.Fatalf("conn %d op %d: block %d lost my write %d", c, i, b, ownLatest[b])
				case who == me && s != ownLatest[b]:
					t.Fatalf("conn %d op %d: block %d shows my write %d, not my latest %d", c, i, b, s, ownLatest[b])
				case who > conns:
					t.Fatalf("conn %d op %d: block %d has an unknown tag %d", c, i, b, who)
				case who != 0 && who != me:
					if s < seen[b][who] {
						t.Fatalf("conn %d op %d: block %d went back in time for writer %d", c, i, b, who)
					}
					seen[b][who] = s
				}
			}
		}
	}
	assert.Zero(t, inst.Server.GatePending())
}

// tagged fills n bytes with the 8-byte tag (writer, seq).
func tagged(writer, seq uint32, n int) []byte {
	var tag [8]byte
	binary.BigEndian.PutUint32(tag[:], writer)
	binary.BigEndian.PutUint32(tag[4:], seq)
	return bytes.Repeat(tag[:], n/8)
}

func untag(b []byte) (writer, seq uint32) {
	return binary.BigEndian.Uint32(b), binary.BigEndian.Uint32(b[4:])
}

// uniform reports whether b repeats its first 8 bytes throughout.
func uniform(b []byte) bool { return bytes.Equal(b[8:], b[:len(b)-8]) }

// A hundred clients at once, each writing and reading back its own region
// through its own connection, structured and simple alike, all get their
// own data back.
func TestHundredClientsKeepTheirOwnData(t *testing.T) {
	const clients = 100
	const region = 64 << 10
	inst := testserver.Start(t, testserver.Options{})
	ctx := testCtx(t)
	errs := make(chan error, clients)
	var wg sync.WaitGroup
	for i := range clients {
		opts := &nbd.ClientOptions{NoStructuredReplies: i%2 == 1}
		c := inst.Dial(t, opts)
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(i), 5))
			base := uint64(i) * region
			model := make([]byte, region)
			got := make([]byte, region)
			for round := range 6 {
				n := 1 + rng.Uint64N(region/2)
				off := rng.Uint64N(region - n)
				data := pattern(uint64(i*100+round), int(n))
				if err := c.Write(ctx, data, base+off, 0); err != nil {
					errs <- fmt.Errorf("client %d write: %w", i, err)
					return
				}
				copy(model[off:], data)
				if err := c.Read(ctx, got, base, 0); err != nil {
					errs <- fmt.Errorf("client %d read: %w", i, err)
					return
				}
				if !bytes.Equal(model, got) {
					errs <- fmt.Errorf("client %d round %d: data differs at +%d", i, round, firstDiff(model, got))
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	assert.Equal(t, clients, inst.Server.NumClients())
}

// Requests that may block run side by side even on one connection: a slow
// disk costs latency, not throughput. The backend holds every call until
// all of them are inside it, which only happens if they run in parallel.
func TestOneConnectionRunsRequestsInParallel(t *testing.T) {
	const parallel = 4
	const stallAt = 32 << 20
	tests := []struct {
		name   string
		length int
		do     func(context.Context, *nbd.Client, []byte, uint64) error
	}{
		{"uncached reads", 4096, func(ctx context.Context, c *nbd.Client, p []byte, off uint64) error {
			return c.Read(ctx, p, off, 0)
		}},
		{"fua writes", 4096, func(ctx context.Context, c *nbd.Client, p []byte, off uint64) error {
			return c.Write(ctx, p, off, nbd.CmdFlagFUA)
		}},
		{"large writes", 512 << 10, func(ctx context.Context, c *nbd.Client, p []byte, off uint64) error {
			return c.Write(ctx, p, off, 0)
		}},
	}
	for _, m := range []mode{structuredMode, simpleMode} {
		for _, tt := range tests {
			t.Run(m.name+"/"+tt.name, func(t *testing.T) {
				be, st := stalledReads(t, stallAt, stallAt+16<<20)
				be.write = func(p []byte, off uint64, fua bool) error {
					if st.covers(off, len(p)) {
						st.hold()
					}
					return be.Backend.WriteAt(p, off, fua)
				}
				for i := range parallel {
					// Data, not holes: a structured read of a hole never
					// reaches ReadAt.
					require.NoError(t, be.Backend.WriteAt(pattern(1, 4096), stallAt+uint64(i)<<20, false))
				}
				inst := m.start(t, testserver.Options{Config: server.Config{Backend: be}})
				st.releaseBeforeShutdown(t)
				c := m.dial(t, inst)
				ctx := testCtx(t)
				errs := make(chan error, parallel)
				for i := range parallel {
					go func() {
						errs <- tt.do(ctx, c, make([]byte, tt.length), stallAt+uint64(i)<<20)
					}()
				}
				st.awaitEntered(t, parallel)
				st.Release()
				for range parallel {
					require.NoError(t, <-errs)
				}
				assert.EqualValues(t, parallel, st.max.Load(), "requests inside the backend at once")
			})
		}
	}
}
