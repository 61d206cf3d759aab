//go:build !race

package server_test

import (
	"io"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/nbd"
)

// A connection whose requests all complete at once (cache-hit reads) keeps
// being served while another connection's long burst of such requests
// runs on a server with one processor: the burst's reader runs them
// itself, and whenever it has run for a turn's quantum without waiting it
// wakes the readers with requests waiting and yields to them.
//
// The server runs in a process of its own (this test binary, re-executed
// with GOMAXPROCS=1), so that the clients, here, do not share its one
// processor. The model: a turn is given only when another connection has
// a request waiting, here only the steady client (one 4 KiB read at a
// time), so each turn lets it complete a request; it must complete at
// least one per eight turns the server reports, and at least 8 in all
// while the burst of 16,384 is answered (on an idle machine it completes
// hundreds; with both cores busy with other work the burst gives fewer
// turns). Before turns, a reader with a buffered burst never waited, and
// the waiting reader was found only by the runtime's monitor, every
// 10 ms: 2-5 requests in a burst of 8,192.
//
// Not under the race detector: there every request is several times
// slower, so that monitor comes round often enough per burst to blur the
// difference; `make test` runs this test in its run without it.
func TestQuickRequestsOfOthersInterleaveWithABurst(t *testing.T) {
	const burst = 16384
	srv := startOneProcessorServer(t)
	addr := srv.Addr
	ctx := testCtx(t)
	steady, err := nbd.Dial(ctx, "tcp", addr, nil)
	require.NoError(t, err)
	defer steady.Close()
	buf := make([]byte, 4096)
	require.NoError(t, steady.Read(ctx, buf, 0, 0))

	rc := dialRaw(t, addr)
	reqs := burstOfReads(burst)

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
	go func() { replies <- readReplies(rc, burst, func() { answered.Add(1) }) }()
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
	turns, _ := srv.Stop(t)
	t.Logf("the steady client completed %d requests while the burst of %d was answered; %d turns given",
		during, burst, turns)
	// When the machine is busy the burst's requests can arrive in pieces
	// and its reader wait between them, which serves the steady client
	// without any turn; the count alone would then pass without them.
	require.NotZero(t, turns, "the burst's reader never gave a turn")
	require.GreaterOrEqual(t, during, int(turns/8),
		"the steady client was starved by the burst: one request per eight turns at least")
	require.GreaterOrEqual(t, during, 8, "the steady client was starved by the burst")
}

// Two connections with long bursts of cache-hit reads take turns on a
// server with one processor: neither reader waits, so neither is ever
// woken by a nudge; the one that runs must yield to the other, which sits
// in the run queue. The model, for 32,768 requests: at least 64 of the
// server's turns went to the other reader (another turn was given while
// the yielding reader waited: the other had run a quantum), and the
// client, reading the two connections' replies in two goroutines, saw
// them interleave at least 16 times. With the rule before, where a turn
// yielded only to readers it had woken, the server's count was 0 and the
// client saw 3-5 interleavings; with this one, 460-860 on an idle machine
// and 26-59 with both cores busy with other work (where the client's
// goroutines read the replies in larger runs).
func TestBurstsOfTwoConnectionsTakeTurns(t *testing.T) {
	const burst = 16384
	srv := startOneProcessorServer(t)
	a, b := dialRaw(t, srv.Addr), dialRaw(t, srv.Addr)
	reqs := burstOfReads(burst)

	// aMarks holds, for each reply of a, how many replies of b had come.
	var bAnswered atomic.Int64
	aMarks := make([]int64, 0, burst)
	aDone, bDone := make(chan error, 1), make(chan error, 1)
	go func() { aDone <- readReplies(a, burst, func() { aMarks = append(aMarks, bAnswered.Load()) }) }()
	go func() { bDone <- readReplies(b, burst, func() { bAnswered.Add(1) }) }()
	_, err := a.nc.Write(reqs)
	require.NoError(t, err)
	_, err = b.nc.Write(reqs)
	require.NoError(t, err)
	require.NoError(t, <-aDone)
	require.NoError(t, <-bDone)

	switches := 0
	for i := 1; i < len(aMarks); i++ {
		if aMarks[i] != aMarks[i-1] && aMarks[i] < burst {
			switches++
		}
	}
	turns, taken := srv.Stop(t)
	t.Logf("the replies of two bursts of %d alternated %d times; %d turns given, %d taken", burst, switches, turns, taken)
	require.GreaterOrEqual(t, taken, uint64(64), "one burst's reader kept the processor from the other's")
	require.GreaterOrEqual(t, switches, 16, "the replies of the two bursts did not interleave")
}

// burstOfReads encodes n 4 KiB reads over the first 4 MiB, to be written
// at once.
func burstOfReads(n int) []byte {
	var reqs []byte
	for i := range n {
		reqs = nbd.AppendRequest(reqs, nbd.Request{Type: nbd.CmdRead, Cookie: uint64(i), Offset: uint64(i%1024) * 4096, Length: 4096})
	}
	return reqs
}

// readReplies reads n replies to 4 KiB reads from rc, calling each after
// every one; an error reply ends it with that error.
func readReplies(rc *rawConn, n int, each func()) error {
	for range n {
		h, err := rc.reply()
		if err == nil && h.Errno != 0 {
			err = h.Errno
		}
		if err == nil {
			_, err = io.CopyN(io.Discard, rc.br, 4096)
		}
		if err != nil {
			return err
		}
		each()
	}
	return nil
}
