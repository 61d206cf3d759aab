package mirror_test

import (
	"context"
	"errors"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/faultnet"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// link puts a faultnet.Link in front of addr for the test's duration.
func link(t testing.TB, addr string) *faultnet.Link {
	k, err := faultnet.New(addr)
	require.NoError(t, err)
	t.Cleanup(func() { k.Close() })
	return k
}

// waitSent waits until the migration has sent at least n bytes more than
// from, so a fault lands in the middle of a pass.
func waitSent(t testing.TB, m *mirror.Mirror, from, n uint64) uint64 {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for {
		st := m.Status()
		if st.BytesSent >= from+n {
			return st.BytesSent
		}
		if st.Done || time.Now().After(deadline) {
			t.Fatalf("migration never sent %d bytes more than %d: %+v", n, from, st)
		}
		time.Sleep(time.Millisecond)
	}
}

// backend wraps a file backend so a test can fail or stall the
// destination's writes and flushes.
type backend struct {
	server.Backend
	write func(p []byte, off uint64, fua bool) error
	sync  func() error
}

func (b *backend) WriteAt(p []byte, off uint64, fua bool) error {
	if b.write != nil {
		return b.write(p, off, fua)
	}
	return b.Backend.WriteAt(p, off, fua)
}

func (b *backend) Sync() error {
	if b.sync != nil {
		return b.sync()
	}
	return b.Backend.Sync()
}

// wrappedDestination serves a new file through a backend the test can
// break.
func wrappedDestination(t testing.TB, size int64, d *mirror.Destination) (*testserver.Instance, *backend, string) {
	t.Helper()
	path := makeFile(t, size, nil)
	f, err := server.OpenFile(path, false)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	be := &backend{Backend: f}
	d.Logger = testLogger(t)
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be, Sessions: d}})
	return inst, be, path
}

// The link is cut three times in the middle of a pass, and refused for a
// while once: every time the migration starts over after a backoff, and
// in the end the destination holds exactly the source.
func TestRetriesUntilTheLinkHolds(t *testing.T) {
	const size = 8 << 20
	path := makeFile(t, size, map[int64][]byte{0: random(11, size)})
	_, exp := source(t, path)
	d := &mirror.Destination{}
	dst := destination(t, size, d)
	k := link(t, dst.Addr)
	k.SetRate(16 << 20) // half a second a pass

	m, err := mirror.Start(testCtx(t), config(t, exp, k.Addr()))
	require.NoError(t, err)
	var sent uint64
	for cut := 0; cut < 3; cut++ {
		sent = waitSent(t, m, sent, 1<<20)
		if cut == 1 {
			k.Refuse(true) // the destination host is down for a while
		}
		k.Cut()
		if cut == 1 {
			time.Sleep(300 * time.Millisecond)
			k.Refuse(false)
		}
	}
	k.SetRate(0)
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	assert.GreaterOrEqual(t, m.Status().Attempts, 4)
	requireSameFiles(t, path, dst.Path)
}

// A destination that goes silent is given up after the request timeout,
// and the bytes of the abandoned connection that arrive later cannot
// overwrite what the next attempt wrote.
func TestSilentDestinationTimesOutAndRetries(t *testing.T) {
	const size = 8 << 20
	path := makeFile(t, size, map[int64][]byte{0: random(12, size)})
	_, exp := source(t, path)
	d := &mirror.Destination{}
	dst := destination(t, size, d)
	k := link(t, dst.Addr)
	k.SetRate(16 << 20)

	cfg := config(t, exp, k.Addr())
	cfg.RequestTimeout = 300 * time.Millisecond
	m, err := mirror.Start(testCtx(t), cfg)
	require.NoError(t, err)
	waitSent(t, m, 0, 2<<20)
	k.Stall()
	eventually(t, "the stalled attempt to be given up", func() bool { return m.Status().Mode == mirror.ModeRetry })
	// The stalled bytes arrive while the next attempt runs.
	k.Resume()
	k.SetRate(0)
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	requireSameFiles(t, path, dst.Path)
}

// Error replies from the destination fail the attempt, and the next one
// completes.
func TestDestinationErrorsAreRetried(t *testing.T) {
	const size = 8 << 20
	path := makeFile(t, size, map[int64][]byte{0: random(13, size)})
	_, exp := source(t, path)
	d := &mirror.Destination{}
	dst, be, dstPath := wrappedDestination(t, size, d)
	var failures atomic.Int32
	be.write = func(p []byte, off uint64, fua bool) error {
		if off >= 4<<20 && failures.Add(1) <= 3 {
			return errors.New("destination disk failed")
		}
		return be.Backend.WriteAt(p, off, fua)
	}
	m, err := mirror.Start(testCtx(t), config(t, exp, dst.Addr))
	require.NoError(t, err)
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	assert.GreaterOrEqual(t, m.Status().Attempts, 2)
	requireSameFiles(t, path, dstPath)
}

// The destination fails during the freeze: the held client requests run
// on the source, no client sees an error, and a later attempt hands off.
func TestFreezeFailureResumesClients(t *testing.T) {
	const size = 16 << 20
	path := makeFile(t, size, map[int64][]byte{0: random(14, 4<<20)})
	src, exp := source(t, path)
	d := &mirror.Destination{}
	dst, be, _ := wrappedDestination(t, size, d)
	var failed atomic.Bool
	be.sync = func() error {
		if src.Server.Held() && failed.CompareAndSwap(false, true) {
			return errors.New("destination died during the freeze")
		}
		return be.Backend.Sync()
	}

	ctx := testCtx(t)
	wctx, stop := context.WithCancel(ctx)
	s := &testserver.Stamper{Blocks: 512}
	writers := make(chan struct{})
	go func() { s.Run(wctx, t, src.Addr, 4, 0); close(writers) }()
	time.Sleep(20 * time.Millisecond)

	m, err := mirror.Start(ctx, config(t, exp, dst.Addr))
	require.NoError(t, err)
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	stop()
	<-writers
	assert.True(t, failed.Load(), "the freeze's flush was failed")
	assert.GreaterOrEqual(t, m.Status().Attempts, 2)
	assert.Zero(t, s.Errs(), "no client request failed")
	assert.Positive(t, s.Writes())
	// Every acknowledged write is on the source, the resumed ones too.
	s.Verify(t, path)
}

// Break stops the migration at every stage within moments, leaves the
// source serving, and a new migration afterwards completes.
func TestBreakAtEveryStage(t *testing.T) {
	const size = 8 << 20
	stages := []struct {
		name string
		// arrange returns once the migration is in the stage.
		arrange func(t *testing.T, m *mirror.Mirror, k *faultnet.Link, be *backend, src *testserver.Instance)
	}{
		{"copying", func(t *testing.T, m *mirror.Mirror, k *faultnet.Link, _ *backend, _ *testserver.Instance) {
			waitSent(t, m, 0, 1<<20)
		}},
		{"waiting to retry", func(t *testing.T, m *mirror.Mirror, k *faultnet.Link, _ *backend, _ *testserver.Instance) {
			waitSent(t, m, 0, 1<<20)
			k.Refuse(true)
			k.Cut()
			eventually(t, "the retry's backoff", func() bool { return m.Status().Mode == mirror.ModeRetry })
		}},
		{"frozen", func(t *testing.T, m *mirror.Mirror, k *faultnet.Link, be *backend, src *testserver.Instance) {
			eventually(t, "the freeze", src.Server.Held)
		}},
	}
	for _, stage := range stages {
		t.Run(stage.name, func(t *testing.T) {
			path := makeFile(t, size, map[int64][]byte{0: random(15, size)})
			src, exp := source(t, path)
			d := &mirror.Destination{}
			dst, be, _ := wrappedDestination(t, size, d)
			frozen := make(chan struct{})
			var thaw sync.Once
			t.Cleanup(func() { thaw.Do(func() { close(frozen) }) })
			be.sync = func() error {
				if src.Server.Held() {
					<-frozen // the freeze's flush never returns
				}
				return be.Backend.Sync()
			}
			k := link(t, dst.Addr)
			k.SetRate(8 << 20)
			cfg := config(t, exp, k.Addr())
			cfg.RetryMin, cfg.RetryMax = 5*time.Second, 5*time.Second
			if stage.name == "frozen" {
				k.SetRate(0)
			}
			m, err := mirror.Start(testCtx(t), cfg)
			require.NoError(t, err)
			stage.arrange(t, m, k, be, src)

			start := time.Now()
			require.NoError(t, m.Break())
			took := time.Since(start)
			assert.Less(t, took, 3*time.Second, "break took %v", took)
			require.ErrorIs(t, m.Err(), mirror.ErrStopped)
			assert.False(t, src.Server.Held())
			assert.False(t, d.HasControl())

			// The source serves as before.
			c := src.Dial(t, nil)
			require.NoError(t, c.Write(testCtx(t), random(16, 4096), 0, nbd.CmdFlagFUA))

			// And a second migration, over a healthy link, completes.
			k.SetRate(0)
			k.Refuse(false)
			thaw.Do(func() { close(frozen) })
			m2, err := mirror.Start(testCtx(t), config(t, exp, dst.Addr))
			require.NoError(t, err)
			require.NoError(t, waitDone(t, m2))
			waitComplete(t, d)
			require.ErrorIs(t, m2.Break(), mirror.ErrCompleted)
		})
	}
}

// The copy keeps to the speed limit, also when it changes midway, and
// the freeze is not held back by it.
func TestSpeedLimit(t *testing.T) {
	const size = 6 << 20
	path := makeFile(t, size, map[int64][]byte{0: random(17, size)})
	_, exp := source(t, path)
	d := &mirror.Destination{}
	dst := destination(t, size, d)
	cfg := config(t, exp, dst.Addr)
	cfg.MaxBytesPerSecond = 2 << 20
	cfg.ChunkSize = 256 << 10
	start := time.Now()
	m, err := mirror.Start(testCtx(t), cfg)
	require.NoError(t, err)
	waitSent(t, m, 0, 2<<20)
	atHalf := time.Since(start)
	assert.Equal(t, uint64(2<<20), m.Status().SpeedLimit)
	m.SetSpeedLimit(4 << 20)
	require.NoError(t, waitDone(t, m))
	total := time.Since(start)
	// Never faster than the limits allow: 2 MiB at 2 MiB/s (less the one
	// chunk that goes at once), the rest at 4 MiB/s.
	assert.GreaterOrEqual(t, atHalf, 850*time.Millisecond)
	assert.GreaterOrEqual(t, total, atHalf+850*time.Millisecond)
	requireSameFiles(t, path, dst.Path)
}

// Clients writing faster than the link can copy: the passes stop
// shrinking, the mirror switches to active mode, and it completes with
// every acknowledged write on the destination.
func TestConvergesWhenClientsOutpaceTheLink(t *testing.T) {
	const size = 32 << 20
	path := makeFile(t, size, map[int64][]byte{0: random(18, size)})
	src, exp := source(t, path)
	d := &mirror.Destination{}
	dst := destination(t, size, d)
	k := link(t, dst.Addr)
	k.SetRate(32 << 20)

	ctx := testCtx(t)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	s := &testserver.Stamper{Blocks: 2048}
	writers := make(chan struct{})
	go func() { s.Run(wctx, t, src.Addr, 4, 0); close(writers) }()

	cfg := config(t, exp, k.Addr())
	cfg.Finish = mirror.FinishExit
	cfg.RequestTimeout = 10 * time.Second
	m, err := mirror.Start(ctx, cfg)
	require.NoError(t, err)
	sawActive := false
	eventually(t, "the end of the migration", func() bool {
		st := m.Status()
		sawActive = sawActive || st.Mode == mirror.ModeActive
		return st.Done
	})
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	<-writers
	assert.True(t, sawActive, "the mirror never switched to active mode")
	s.Verify(t, dst.Path)
	require.NoError(t, src.Server.Close())
	requireSameFiles(t, path, dst.Path)
}

// unlinkWatch is a destination that checks, at the final flush and at the
// end of the source's session, whether the source file still exists.
type unlinkWatch struct {
	*mirror.Destination
	src                      string
	existedAtEnd, endChecked atomic.Bool
}

func (u *unlinkWatch) Ended(e server.SessionEnd) {
	if e.Disconnected && e.FlushedLast {
		_, err := os.Stat(u.src)
		u.existedAtEnd.Store(err == nil)
		u.endChecked.Store(true)
	}
	u.Destination.Ended(e)
}

// With FinishUnlink the source file is removed after the destination
// acknowledged its final flush and before the DISC that completes it.
func TestUnlinkBetweenFinalFlushAndDisc(t *testing.T) {
	const size = 4 << 20
	path := makeFile(t, size, map[int64][]byte{0: random(19, size)})
	want, err := os.ReadFile(path)
	require.NoError(t, err)
	src, exp := source(t, path)
	d := &mirror.Destination{Logger: testLogger(t)}
	w := &unlinkWatch{Destination: d, src: path}
	dstPath := makeFile(t, size, nil)
	f, err := server.OpenFile(dstPath, false)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() }) // after the server's shutdown
	var existedAtFinalFlush atomic.Bool
	be := &backend{Backend: f}
	be.sync = func() error {
		if src.Server.Held() {
			_, err := os.Stat(path)
			existedAtFinalFlush.Store(err == nil)
		}
		return f.Sync()
	}
	dst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be, Sessions: w}})

	cfg := config(t, exp, dst.Addr)
	cfg.Finish = mirror.FinishUnlink
	cfg.Unlink = func() error { return os.Remove(path) }
	m, err := mirror.Start(testCtx(t), cfg)
	require.NoError(t, err)
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	assert.True(t, existedAtFinalFlush.Load(), "the source file was there when the final flush ran")
	require.True(t, w.endChecked.Load())
	assert.False(t, w.existedAtEnd.Load(), "the source file was gone when the DISC arrived")
	_, err = os.Stat(path)
	assert.True(t, os.IsNotExist(err))
	got, err := os.ReadFile(dstPath)
	require.NoError(t, err)
	assert.Equal(t, want, got)
}

// The copy to a destination on this host does not pace (BBR's timer costs
// throughput on loopback), as the server's local clients do not.
func TestCopyToALocalDestinationIsNotPaced(t *testing.T) {
	def, err := os.ReadFile("/proc/sys/net/ipv4/tcp_congestion_control")
	if err != nil || !strings.Contains(string(def), "bbr") {
		t.Skipf("the default congestion control (%q) does not pace; this test needs BBR", strings.TrimSpace(string(def)))
	}
	ss := testserver.Tool(t, "ss")
	const size = 8 << 20
	path := makeFile(t, size, map[int64][]byte{0: random(31, size)})
	_, exp := source(t, path)
	d := &mirror.Destination{}
	dst := destination(t, size, d)
	cfg := config(t, exp, dst.Addr)
	cfg.MaxBytesPerSecond = 4 << 20 // time to look at the socket
	m, err := mirror.Start(testCtx(t), cfg)
	require.NoError(t, err)
	defer m.Break()
	waitSent(t, m, 0, 1<<20)
	_, port, err := net.SplitHostPort(dst.Addr)
	require.NoError(t, err)
	out := testserver.Run(t, 10*time.Second, ss, "-H", "-t", "-i", "state", "established", "( dport = :"+port+" )")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 2, "the mirror's socket: its address line and its info line:\n%s", out)
	assert.NotContains(t, strings.Fields(lines[1])[0], "bbr", "the mirror's connection paces:\n%s", out)
}
