package mirror_test

import (
	"context"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// copyPaths runs a test with the copy's payloads sent from the file by
// the kernel (the default) and read into buffers.
func copyPaths(t *testing.T, run func(t *testing.T, noSendFile bool)) {
	t.Run("sendfile", func(t *testing.T) { run(t, false) })
	t.Run("buffered", func(t *testing.T) { run(t, true) })
}

// A quiet export arrives whole: data as data, holes as holes, with a
// tail that is not a multiple of the block sizes involved.
func TestMigrateCopiesDataAndKeepsHoles(t *testing.T) {
	copyPaths(t, testMigrateCopiesDataAndKeepsHoles)
}

func testMigrateCopiesDataAndKeepsHoles(t *testing.T, noSendFile bool) {
	const size = 48<<20 + 4096*3 + 512
	fill := map[int64][]byte{
		0:               random(1, 3<<20),
		10 << 20:        random(2, 4096),
		20<<20 + 100:    random(3, 5<<20),
		size - 512 - 17: random(4, 17),
	}
	path := makeFile(t, size, fill)
	_, exp := source(t, path)
	d := &mirror.Destination{}
	dst := destination(t, size, d)

	require.NotNil(t, exp.(mirror.FileExport).SourceFile(), "a served file offers its file to send from")
	cfg := config(t, exp, dst.Addr)
	cfg.NoSendFile = noSendFile
	m, err := mirror.Start(testCtx(t), cfg)
	require.NoError(t, err)
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	requireSameFiles(t, path, dst.Path)
	assert.Less(t, allocated(t, dst.Path), int64(12<<20), "holes stay holes on the destination")
	st := m.Status()
	assert.True(t, st.Done)
	assert.Equal(t, 1, st.Attempts)
	assert.Positive(t, st.LastFreeze)
	assert.Less(t, st.BytesSent, uint64(16<<20), "only data is sent")
}

// Writes from several clients during the migration are all on the
// destination after the hand-off, each block in its last acknowledged
// version; the write held at the hand-off ran nowhere.
func TestMigrateUnderWritesLosesNothing(t *testing.T) {
	copyPaths(t, testMigrateUnderWritesLosesNothing)
}

func testMigrateUnderWritesLosesNothing(t *testing.T, noSendFile bool) {
	const size = 64 << 20
	path := makeFile(t, size, map[int64][]byte{0: random(5, 16<<20)})
	src, exp := source(t, path)
	d := &mirror.Destination{}
	dst := destination(t, size, d)

	ctx := testCtx(t)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	s := &testserver.Stamper{Blocks: 1024}
	writers := make(chan struct{})
	go func() { s.Run(wctx, t, src.Addr, 4, 0); close(writers) }()
	// Let the writers get going before the copy starts.
	time.Sleep(50 * time.Millisecond)

	cfg := config(t, exp, dst.Addr)
	cfg.Finish = mirror.FinishExit
	cfg.NoSendFile = noSendFile
	m, err := mirror.Start(ctx, cfg)
	require.NoError(t, err)
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	select {
	case <-writers:
	case <-time.After(testTimeout):
		t.Fatal("writers not stopped by the hand-off")
	}
	require.Positive(t, s.Writes())
	s.Verify(t, dst.Path)
	// Everything else matches the source as it was.
	require.NoError(t, src.Server.Close())
	requireSameFiles(t, path, dst.Path)
}

// Before the hand-off the destination serves only its source; a client
// asking for any other export is refused in the handshake with a reason.
func TestDestinationRefusesOtherClientsUntilHandOff(t *testing.T) {
	d := &mirror.Destination{ThenServe: true}
	dst := destination(t, 8<<20, d)
	ctx := testCtx(t)
	_, err := nbd.Dial(ctx, "tcp", dst.Addr, nil)
	var oe *nbd.OptionError
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, nbd.RepErrPolicy, oe.Rep)
	assert.Contains(t, oe.Message, "only its migration source")
	assert.False(t, d.HasControl())

	path := makeFile(t, 8<<20, map[int64][]byte{4096: random(9, 8192)})
	_, exp := source(t, path)
	m, err := mirror.Start(ctx, config(t, exp, dst.Addr))
	require.NoError(t, err)
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	assert.True(t, d.HasControl())

	// With ThenServe everyone is welcome now, and sees the data.
	c, err := nbd.Dial(ctx, "tcp", dst.Addr, nil)
	require.NoError(t, err)
	defer c.Close()
	got := make([]byte, 8192)
	require.NoError(t, c.Read(ctx, got, 4096, 0))
	assert.Equal(t, random(9, 8192), got)
}

// Start fails without retrying, with the C flexnbd's reasons.
func TestStartFailures(t *testing.T) {
	path := makeFile(t, 1<<20, nil)
	_, exp := source(t, path)

	t.Run("nothing listening", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		addr := l.Addr().String()
		l.Close()
		_, err = mirror.Start(testCtx(t), config(t, exp, addr))
		require.ErrorIs(t, err, mirror.ErrConnect)
	})
	t.Run("closed before the greeting", func(t *testing.T) {
		addr := fakeServer(t, func(c net.Conn) { c.Close() })
		_, err := mirror.Start(testCtx(t), config(t, exp, addr))
		require.ErrorIs(t, err, mirror.ErrRejected)
	})
	t.Run("no greeting", func(t *testing.T) {
		addr := fakeServer(t, func(c net.Conn) { io.Copy(io.Discard, c); c.Close() })
		cfg := config(t, exp, addr)
		cfg.GreetingTimeout = 200 * time.Millisecond
		_, err := mirror.Start(testCtx(t), cfg)
		require.ErrorIs(t, err, mirror.ErrNoGreeting)
	})
	t.Run("wrong greeting", func(t *testing.T) {
		addr := fakeServer(t, func(c net.Conn) { c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")); c.Close() })
		_, err := mirror.Start(testCtx(t), config(t, exp, addr))
		require.ErrorIs(t, err, mirror.ErrRejected)
	})
	t.Run("size mismatch", func(t *testing.T) {
		dst := destination(t, 2<<20, &mirror.Destination{})
		_, err := mirror.Start(testCtx(t), config(t, exp, dst.Addr))
		require.ErrorIs(t, err, mirror.ErrSizeMismatch)
	})
	t.Run("refused by policy", func(t *testing.T) {
		d := &mirror.Destination{}
		dst := destination(t, 1<<20, d)
		// Completed already and not serving: refuses sources too.
		other := makeFile(t, 1<<20, nil)
		_, otherExp := source(t, other)
		m, err := mirror.Start(testCtx(t), config(t, otherExp, dst.Addr))
		require.NoError(t, err)
		require.NoError(t, waitDone(t, m))
		_, err = nbd.Dial(testCtx(t), "tcp", dst.Addr, &nbd.ClientOptions{ExportName: "x"})
		require.Error(t, err)
	})
}

// fakeServer accepts connections and hands each to serve.
func fakeServer(t testing.TB, serve func(net.Conn)) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	var wg sync.WaitGroup
	t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { serve(c) })
		}
	})
	return l.Addr().String()
}

// A 16 GiB export holding a few MiB of data: the holes cost a handful of
// queries, not 16 GiB of traffic, and stay holes on the destination.
func TestMigrateLargeSparseExport(t *testing.T) {
	const size = 16 << 30
	fill := map[int64][]byte{}
	for i := int64(0); i < 8; i++ {
		fill[i*(2<<30)+12345*4096] = random(uint64(20+i), 256<<10)
	}
	path := makeFile(t, size, fill)
	_, exp := source(t, path)
	d := &mirror.Destination{}
	dst := destination(t, size, d)
	m, err := mirror.Start(testCtx(t), config(t, exp, dst.Addr))
	require.NoError(t, err)
	require.NoError(t, waitDone(t, m))
	waitComplete(t, d)
	assert.Equal(t, uint64(8*256<<10), m.Status().BytesSent, "only the data is sent")
	assert.Less(t, allocated(t, dst.Path), int64(8<<20))
	for off, want := range fill {
		got := make([]byte, len(want))
		f, err := os.Open(dst.Path)
		require.NoError(t, err)
		_, err = f.ReadAt(got, off)
		f.Close()
		require.NoError(t, err)
		require.Equal(t, want, got, "data at %d", off)
	}
}

// A server that is not a destination (serve) refuses a migration source
// in the handshake, and serves everyone else.
func TestSourcePolicyRefusesMigrationSources(t *testing.T) {
	path := makeFile(t, 1<<20, nil)
	_, exp := source(t, path)
	live := testserver.Start(t, testserver.Options{Size: 1 << 20, Config: server.Config{Sessions: mirror.Source{}}})
	_, err := mirror.Start(testCtx(t), config(t, exp, live.Addr))
	require.ErrorIs(t, err, mirror.ErrRejected)
	assert.Contains(t, err.Error(), "not a migration destination")
	c := live.Dial(t, nil)
	require.NoError(t, c.Write(testCtx(t), random(30, 4096), 0, 0))
}

// An oldstyle destination cannot tell its source from anyone else, so as
// in the C flexnbd the first connection is the source and later ones are
// refused while it lasts.
func TestOldstyleDestinationTakesOneConnectionAtATime(t *testing.T) {
	d := &mirror.Destination{Oldstyle: true}
	dst := destination(t, 1<<20, d)
	ctx := testCtx(t)
	first, err := nbd.Dial(ctx, "tcp", dst.Addr, nil)
	require.NoError(t, err)
	require.True(t, first.Session().Oldstyle)
	_, err = nbd.Dial(ctx, "tcp", dst.Addr, nil)
	require.Error(t, err, "a second connection while the first lasts")

	first.Abort()
	eventually(t, "a new source to be admitted", func() bool {
		c, err := nbd.Dial(ctx, "tcp", dst.Addr, nil)
		if err != nil {
			return false
		}
		c.Abort()
		return true
	})
	assert.False(t, d.HasControl())
}
