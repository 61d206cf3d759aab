//go:build !race

package server_test

import (
	"io"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// A connection whose requests all complete at once (cache-hit reads) keeps
// being served while another connection's long burst of such requests
// runs on a server with one processor: the burst's reader runs them
// itself, and every turnAfter (64) of them it wakes the readers with
// requests waiting and yields to them.
//
// The server runs in a process of its own (this test binary, re-executed
// with GOMAXPROCS=1), so that the clients, here, do not share its one
// processor. The model: the burst is 16,384 requests written at once, so
// 256 turns; the steady client, one 4 KiB read at a time, must
// complete at least one request per eight turns while the burst's replies
// come back. Before turns, a reader with a buffered burst never waited,
// and the waiting reader was found only by the runtime's monitor, every
// 10 ms: a handful of requests in the whole burst. The server also
// reports how many turns it gave, which must not be none.
//
// Not under the race detector: there every request is several times
// slower, so that monitor comes round often enough per burst to blur the
// difference; `make test` runs this test in its run without it.
func TestQuickRequestsOfOthersInterleaveWithABurst(t *testing.T) {
	const (
		burst     = 16384
		turnAfter = server.TurnAfter
	)
	srv := startOneProcessorServer(t)
	addr := srv.Addr
	ctx := testCtx(t)
	steady, err := nbd.Dial(ctx, "tcp", addr, nil)
	require.NoError(t, err)
	defer steady.Close()
	buf := make([]byte, 4096)
	require.NoError(t, steady.Read(ctx, buf, 0, 0))

	rc := dialRaw(t, addr)
	var reqs []byte
	for i := range burst {
		reqs = nbd.AppendRequest(reqs, nbd.Request{Type: nbd.CmdRead, Cookie: uint64(i), Offset: uint64(i%1024) * 4096, Length: 4096})
	}

	// marks holds, for each request of the steady client that completed,
	// how many burst replies had arrived by then.
	var answered atomic.Int64
	var marks []int64
	stop := make(chan struct{})
	steadyDone := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				steadyDone <- nil
				return
			default:
			}
			if err := steady.Read(ctx, buf, 8192, 0); err != nil {
				steadyDone <- err
				return
			}
			marks = append(marks, answered.Load())
		}
	}()

	replies := make(chan error, 1)
	go func() {
		for range burst {
			h, err := rc.reply()
			if err == nil && h.Errno != 0 {
				err = h.Errno
			}
			if err == nil {
				_, err = io.CopyN(io.Discard, rc.br, 4096)
			}
			if err != nil {
				replies <- err
				return
			}
			answered.Add(1)
		}
		replies <- nil
	}()
	_, err = rc.nc.Write(reqs)
	require.NoError(t, err)
	require.NoError(t, <-replies)
	close(stop)
	require.NoError(t, <-steadyDone)

	during := 0
	for _, m := range marks {
		if m > 0 && m < burst {
			during++
		}
	}
	turns := srv.Stop(t)
	t.Logf("the steady client completed %d requests while the burst of %d was answered; %d turns given",
		during, burst, turns)
	// When the machine is busy the burst's requests can arrive in pieces
	// and its reader wait between them, which serves the steady client
	// without any turn; the count alone would then pass without them.
	require.NotZero(t, turns, "the burst's reader never gave a turn")
	require.GreaterOrEqual(t, during, burst/turnAfter/8,
		"the steady client was starved by the burst: one request per eight turns at least")
}
