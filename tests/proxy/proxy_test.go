package proxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
)

// restarts is how many times the fault tests kill the server.
const restarts = 3

// killAndRestart kills b and starts it again, restarts times, while load
// runs; it returns once done.
func killAndRestart(t *testing.T, b *backend, every, down time.Duration) {
	t.Helper()
	for range restarts {
		time.Sleep(every)
		b.kill(t)
		time.Sleep(down)
		b.start(t)
	}
}

// Clients writing through the proxy see no error while the server behind
// it is SIGKILLed and restarted, and every write they saw acknowledged is
// in the file afterwards, in its latest version.
func TestServerRestartsAreInvisible(t *testing.T) {
	b := newBackend(t, 64<<20)
	b.start(t)
	p, addr := startProxy(t, b.addr())

	s, stop := stamp(t, addr, 512)
	killAndRestart(t, b, 300*time.Millisecond, 100*time.Millisecond)
	time.Sleep(200 * time.Millisecond) // writes after the last restart too
	stop()
	require.Zero(t, s.Errs(), "no client saw an error")
	require.Positive(t, s.Writes())
	s.Verify(t, b.file)
	text := p.Stderr.Text()
	assert.GreaterOrEqual(t, strings.Count(text, "upstream reconnected"), restarts,
		"each client reconnected after each kill:\n%s", text)
}

// fio's own verification, through libnbd, across server kills.
func TestFioVerifiesAcrossRestarts(t *testing.T) {
	fio := testserver.Tool(t, "fio")
	b := newBackend(t, 128<<20)
	b.start(t)
	p, addr := startProxy(t, b.addr())

	var out []byte
	var err error
	done := make(chan struct{})
	go func() {
		defer close(done)
		ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
		defer cancel()
		out, err = exec.CommandContext(ctx, fio, "--name=proxy", "--ioengine=nbd", "--uri=nbd://"+addr,
			"--rw=randwrite", "--bs=4k", "--size=64M", "--iodepth=16", "--verify=crc32c",
			"--do_verify=1", "--verify_fatal=1", "--number_ios=40000").CombinedOutput()
	}()
	// Kill the server every 400 ms for as long as fio runs (ten times at
	// most): its data connection may start late on a loaded machine.
	kills := 0
	for running := true; running && kills < 10; {
		select {
		case <-done:
			running = false
		case <-time.After(400 * time.Millisecond):
			b.kill(t)
			time.Sleep(100 * time.Millisecond)
			b.start(t)
			kills++
		}
	}
	<-done
	require.NoError(t, err, "fio:\n%s", out)
	require.Contains(t, string(out), "err= 0", "fio:\n%s", out)
	require.Positive(t, kills)
	assert.Contains(t, p.Stderr.Text(), "upstream reconnected", "a kill came while fio ran")
}

// With --max-outage, requests fail with EIO once the server has been away
// that long, and the connection works again when it is back.
func TestMaxOutageFailsRequestsWithEIO(t *testing.T) {
	b := newBackend(t, 1<<20)
	b.start(t)
	_, addr := startProxy(t, b.addr(), "--max-outage", "300ms")
	ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
	defer cancel()
	c, err := nbd.Dial(ctx, "tcp", addr, nil)
	require.NoError(t, err)
	defer c.Close()
	buf := make([]byte, 4096)
	require.NoError(t, c.Read(ctx, buf, 0, 0))
	b.kill(t)
	start := time.Now()
	err = c.Read(ctx, buf, 0, 0)
	require.ErrorIs(t, err, nbd.EIO)
	assert.GreaterOrEqual(t, time.Since(start), 300*time.Millisecond, "not before the outage allowed")
	b.start(t)
	require.Eventually(t, func() bool { return c.Read(ctx, buf, 0, 0) == nil }, testproc.Timeout,
		50*time.Millisecond, "the connection works again once the server is back")
}

// Real clients through the proxy, over TCP and a Unix socket.
func TestRealClientsThroughTheProxy(t *testing.T) {
	b := newBackend(t, 32<<20)
	b.start(t)
	_, addr := startProxy(t, b.addr())
	uri := "nbd://" + addr

	t.Run("qemu-io", func(t *testing.T) {
		qemuIO := testserver.Tool(t, "qemu-io")
		out := testserver.Run(t, testproc.Timeout, qemuIO, "-f", "raw", uri,
			"-c", "write -P 0x3c 1M 2M", "-c", "read -P 0x3c 1M 2M", "-c", "flush",
			"-c", "write -z 5M 1M", "-c", "read -P 0 5M 1M", "-c", "discard 1M 64k")
		assert.NotContains(t, out, "failed", out)
		assert.NotContains(t, out, "Pattern verification failed", out)
	})
	t.Run("nbdinfo", func(t *testing.T) {
		out := testserver.Run(t, testproc.Timeout, testserver.Tool(t, "nbdinfo"), uri)
		assert.Contains(t, out, "export-size: 33554432")
		for _, want := range []string{"can_flush: true", "can_fua: true", "can_trim: true", "can_zero: true",
			"can_multi_conn: true", "base:allocation"} {
			assert.Contains(t, out, want)
		}
		m := testserver.Run(t, testproc.Timeout, testserver.Tool(t, "nbdinfo"), "--map", uri)
		assert.Contains(t, m, "hole,zero", "holes show through the proxy:\n%s", m)
	})
	t.Run("nbdcopy both ways", func(t *testing.T) {
		nbdcopy := testserver.Tool(t, "nbdcopy")
		src := filepath.Join(t.TempDir(), "src.img")
		data := bytes.Repeat([]byte("through the proxy "), (8<<20)/18+1)[:8<<20]
		require.NoError(t, os.WriteFile(src, data, 0o644))
		require.NoError(t, os.Truncate(src, 32<<20))
		testserver.Run(t, testproc.Timeout, nbdcopy, src, uri)
		back := filepath.Join(t.TempDir(), "back.img")
		testserver.Run(t, testproc.Timeout, nbdcopy, uri, back)
		got, err := os.ReadFile(back)
		require.NoError(t, err)
		require.Len(t, got, 32<<20)
		assert.True(t, bytes.Equal(data, got[:8<<20]), "data came back unchanged")
		assert.True(t, bytes.Equal(make([]byte, 24<<20), got[8<<20:]), "the rest reads as zeroes")
	})
	t.Run("unix socket downstream", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "proxy.sock")
		host, port := splitHostPort(t, b.addr())
		p := testproc.Start(t, "", bin, "proxy", "--addr", sock, "--conn-addr", host, "--conn-port", port, "-v")
		p.Stderr.WaitFor(t, "proxying")
		out := testserver.Run(t, testproc.Timeout, testserver.Tool(t, "nbdinfo"), "nbd+unix:///?socket="+sock)
		assert.Contains(t, out, "export-size: 33554432")
		p.Signal(t, 15)
		assert.Zero(t, p.Wait(t))
		_, err := os.Stat(sock)
		assert.True(t, errors.Is(err, os.ErrNotExist), "the socket file is removed on exit")
	})
}

// Started before its server, the proxy holds a client's handshake until
// the server appears (the C proxy exits 0 there).
func TestUpstreamThatAppearsLater(t *testing.T) {
	b := newBackend(t, 16<<20)
	p, addr := startProxy(t, b.addr())

	type dialed struct {
		c   *nbd.Client
		err error
	}
	ch := make(chan dialed, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
		defer cancel()
		c, err := nbd.Dial(ctx, "tcp", addr, &nbd.ClientOptions{HandshakeTimeout: testproc.Timeout})
		ch <- dialed{c, err}
	}()
	time.Sleep(500 * time.Millisecond)
	select {
	case d := <-ch:
		t.Fatalf("handshake finished with no server behind the proxy: %v", d.err)
	case <-p.Done():
		t.Fatalf("proxy exited without a server:\n%s", p.Stderr.Text())
	default:
	}
	b.start(t)
	d := <-ch
	require.NoError(t, d.err)
	defer d.c.Close()
	assert.Equal(t, uint64(16<<20), d.c.Size())
	ctx := context.Background()
	require.NoError(t, d.c.Write(ctx, bytes.Repeat([]byte{7}, 4096), 8192, nbd.CmdFlagFUA))
	got := make([]byte, 4096)
	require.NoError(t, d.c.Read(ctx, got, 8192, 0))
	assert.Equal(t, bytes.Repeat([]byte{7}, 4096), got)
}

// An error the server answers is the client's answer, not a reason to
// reconnect; the connection goes on working.
func TestErrorRepliesPassThrough(t *testing.T) {
	b := newBackend(t, 1<<20)
	b.start(t)
	p, addr := startProxy(t, b.addr())
	ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
	defer cancel()
	for _, opts := range []*nbd.ClientOptions{{}, {NoStructuredReplies: true}} {
		c, err := nbd.Dial(ctx, "tcp", addr, opts)
		require.NoError(t, err)
		_, err = c.Do(ctx, nbd.Request{Type: nbd.CmdWrite, Offset: 1 << 20, Length: 4096}, make([]byte, 4096), nil)
		assert.ErrorIs(t, err, nbd.ENOSPC, "a write past the end")
		_, err = c.Do(ctx, nbd.Request{Type: nbd.CmdRead, Offset: 1<<20 - 512, Length: 4096}, nil, make([]byte, 4096))
		assert.ErrorIs(t, err, nbd.EINVAL, "a read past the end")
		if !opts.NoStructuredReplies {
			var se *nbd.ServerError
			require.ErrorAs(t, err, &se)
			assert.NotEmpty(t, se.Message, "the server's message comes through")
		}
		require.NoError(t, c.Write(ctx, []byte("still working"), 0, 0))
		got := make([]byte, 13)
		require.NoError(t, c.Read(ctx, got, 0, 0))
		assert.Equal(t, "still working", string(got))
		require.NoError(t, c.Close())
	}
	assert.NotContains(t, p.Stderr.Text(), "reconnect")
}

// Several clients at once, each on its own upstream connection, all
// answered across a restart.
func TestSeveralClientsAcrossARestart(t *testing.T) {
	b := newBackend(t, 16<<20)
	b.start(t)
	_, addr := startProxy(t, b.addr())
	ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
	defer cancel()
	const clients = 6
	cs := make([]*nbd.Client, clients)
	for i := range cs {
		c, err := nbd.Dial(ctx, "tcp", addr, nil)
		require.NoError(t, err)
		defer c.Close()
		cs[i] = c
	}
	b.kill(t)
	var wg sync.WaitGroup
	errs := make([]error, clients)
	for i, c := range cs {
		wg.Go(func() {
			p := bytes.Repeat([]byte{byte(i + 1)}, 64<<10)
			errs[i] = c.Write(ctx, p, uint64(i)<<20, nbd.CmdFlagFUA)
		})
	}
	time.Sleep(200 * time.Millisecond)
	b.start(t)
	wg.Wait()
	for i, c := range cs {
		require.NoError(t, errs[i], "client %d", i)
		got := make([]byte, 64<<10)
		require.NoError(t, c.Read(ctx, got, uint64(i)<<20, 0))
		assert.Equal(t, bytes.Repeat([]byte{byte(i + 1)}, 64<<10), got, "client %d", i)
	}
}

// A server stopped (not dead) past the proxy's timeout: the proxy gives
// up on the connection and replays on a new one while the server still
// holds the originals. Once it runs again, the fence (nbd.OptFence) makes
// the old connection finish or drop what it had before the replays run,
// so every acknowledged write is on disk in its latest version.
func TestStoppedServerCannotOvertakeReplays(t *testing.T) {
	t.Setenv("FLEXNBD_UPSTREAM_TIMEOUT", "1")
	b := newBackend(t, 16<<20)
	b.start(t)
	p, addr := startProxy(t, b.addr())

	s, stop := stamp(t, addr, 256)
	time.Sleep(300 * time.Millisecond)
	b.proc.Signal(t, syscall.SIGSTOP)
	time.Sleep(2500 * time.Millisecond) // past the 1 s timeout, and a few dials
	b.proc.Signal(t, syscall.SIGCONT)
	time.Sleep(500 * time.Millisecond)
	stop()
	require.Zero(t, s.Errs(), "no client saw an error")
	s.Verify(t, b.file)
	text := p.Stderr.Text()
	assert.Contains(t, text, "upstream reconnected", "the proxy gave up on the stopped server")
	assert.NotContains(t, text, "does not take fences")
}

// The orchestrator's recipe: point the proxy at the destination first and
// the source second, then migrate. The destination refuses clients until
// the hand-off, so the proxy stays on the source; at the hand-off its
// clients move to the destination, their held writes replayed there.
func TestMigrationBehindTheProxy(t *testing.T) {
	const size = 32 << 20
	dir := t.TempDir()
	srcFile, dstFile := filepath.Join(dir, "src.img"), filepath.Join(dir, "dst.img")
	for _, f := range []string{srcFile, dstFile} {
		require.NoError(t, os.WriteFile(f, nil, 0o644))
		require.NoError(t, os.Truncate(f, size))
	}
	srcSock, proxySock := filepath.Join(dir, "src.sock"), filepath.Join(dir, "proxy.sock")
	srcPort, dstPort := testproc.FreePort(t), testproc.FreePort(t)
	src := testproc.Start(t, "", bin, "serve", "--addr", "127.0.0.1", "--port", testproc.Itoa(srcPort),
		"--file", srcFile, "--sock", srcSock, "-v")
	src.Stderr.WaitFor(t, "control socket ready")
	dst := testproc.Start(t, "", bin, "listen", "--addr", "127.0.0.1", "--port", testproc.Itoa(dstPort),
		"--file", dstFile, "--then-serve", "-v")
	dst.Stderr.WaitFor(t, "waiting for a migration")
	srcAddr, dstAddr := "127.0.0.1:"+testproc.Itoa(srcPort), "127.0.0.1:"+testproc.Itoa(dstPort)
	p, addr := startProxy(t, srcAddr, "--sock", proxySock)
	p.Stderr.WaitFor(t, "control socket ready")

	out, errOut, code := testproc.Run(t, nil, bin, "upstream", "--sock", proxySock, dstAddr, srcAddr)
	require.Zero(t, code, errOut)
	assert.Equal(t, "updated\n", out)

	s, stop := stamp(t, addr, 512)
	time.Sleep(300 * time.Millisecond)
	out, errOut, code = testproc.Run(t, nil, bin, "mirror", "--sock", srcSock, "--addr", "127.0.0.1",
		"--port", testproc.Itoa(dstPort), "--wait")
	require.Zero(t, code, "mirror: %s %s", out, errOut)
	assert.Zero(t, src.Wait(t), "the source exits 0 after the hand-off")
	before := s.Writes()
	time.Sleep(300 * time.Millisecond)
	out, errOut, code = testproc.Run(t, nil, bin, "status", "--sock", proxySock, "--json")
	require.Zero(t, code, errOut)
	var st map[string]any
	require.NoError(t, json.Unmarshal([]byte(out), &st))
	assert.Equal(t, dstAddr, st["upstream"], "the proxy is on the destination")
	assert.Equal(t, dstAddr+","+srcAddr, st["upstreams"])
	assert.Positive(t, st["reconnects"])
	assert.Equal(t, float64(4), st["clients"])
	stop()
	require.Zero(t, s.Errs(), "no client saw an error across the migration")
	assert.Greater(t, s.Writes(), before, "the clients went on writing, to the destination")
	s.Verify(t, dstFile)
}

// The proxy's control socket: status, upstream, and a clear refusal of a
// server's commands; a server refuses upstream.
func TestProxyControlSocket(t *testing.T) {
	b := newBackend(t, 1<<20)
	b.start(t)
	sock := filepath.Join(t.TempDir(), "proxy.sock")
	p, _ := startProxy(t, b.addr(), "--sock", sock)
	p.Stderr.WaitFor(t, "control socket ready")

	out, errOut, code := testproc.Run(t, nil, bin, "status", "--sock", sock)
	require.Zero(t, code, errOut)
	assert.Regexp(t, `^pid=\d+ upstream=none upstreams=`+b.addr()+` clients=0 connected=0 reconnects=0 replayed=0 `+
		`failed_requests=0 cache_hits=0 longest_outage_ms=0 uptime=\d+ version=\S+ \n$`, out)

	_, errOut, code = testproc.Run(t, nil, bin, "upstream", "--sock", sock, "127.0.0.1:1", "bogus")
	assert.Equal(t, 1, code)
	assert.Equal(t, "bad upstream: bogus\n", errOut)
	out, _, _ = testproc.Run(t, nil, bin, "status", "--sock", sock)
	assert.Contains(t, out, "upstreams="+b.addr()+" ", "a refused list changes nothing")

	out, errOut, code = testproc.Run(t, nil, bin, "upstream", "--sock", sock, "/run/other.sock", b.addr())
	require.Zero(t, code, errOut)
	assert.Equal(t, "updated\n", out)
	out, _, _ = testproc.Run(t, nil, bin, "status", "--sock", sock)
	assert.Contains(t, out, "upstreams=/run/other.sock,"+b.addr()+" ")

	_, errOut, code = testproc.Run(t, nil, bin, "acl", "--sock", sock, "127.0.0.1")
	assert.Equal(t, 1, code)
	assert.Equal(t, "not supported by a proxy\n", errOut)
}

// With --cache a small read fetches twice its length and the next read of
// what follows is answered from the proxy; any write throws the read-ahead
// away, so no read is ever answered with data older than an acknowledged
// write.
func TestCacheReadAhead(t *testing.T) {
	b := newBackend(t, 1<<20)
	b.start(t)
	sock := filepath.Join(t.TempDir(), "proxy.sock")
	p, addr := startProxy(t, b.addr(), "--cache", "--sock", sock)
	p.Stderr.WaitFor(t, "control socket ready")
	hits := func() string {
		out, errOut, code := testproc.Run(t, nil, bin, "status", "--sock", sock, "--json")
		require.Zero(t, code, errOut)
		var st map[string]any
		require.NoError(t, json.Unmarshal([]byte(out), &st))
		return fmt.Sprint(st["cache_hits"])
	}
	ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
	defer cancel()
	c, err := nbd.Dial(ctx, "tcp", addr, nil)
	require.NoError(t, err)
	defer c.Close()
	assert.Zero(t, c.Flags()&nbd.FlagCanMultiConn, "no multi-conn promise with a read-ahead")

	a := bytes.Repeat([]byte{0xa1}, 8192)
	require.NoError(t, c.Write(ctx, a, 0, nbd.CmdFlagFUA))
	got := make([]byte, 4096)
	require.NoError(t, c.Read(ctx, got, 0, 0))
	assert.Equal(t, a[:4096], got)
	assert.Equal(t, "0", hits())
	require.NoError(t, c.Read(ctx, got, 4096, 0))
	assert.Equal(t, a[4096:], got)
	assert.Equal(t, "1", hits(), "the second read came from the read-ahead")

	// A write to the kept range throws it away.
	require.NoError(t, c.Read(ctx, got, 16384, 0)) // keeps [20 KiB, 24 KiB)
	fresh := bytes.Repeat([]byte{0xb2}, 4096)
	require.NoError(t, c.Write(ctx, fresh, 20480, 0))
	require.NoError(t, c.Read(ctx, got, 20480, 0))
	assert.Equal(t, fresh, got, "never older than an acknowledged write")
	assert.Equal(t, "1", hits())
}

// The C flexnbd's fleets speak oldstyle: the proxy takes an oldstyle
// server upstream (it cannot be fenced, and says so) and greets clients
// the oldstyle way with --oldstyle.
func TestOldstyleBothSides(t *testing.T) {
	b := newBackend(t, 1<<20)
	b.proc = testproc.Start(t, "", bin, "serve", "--addr", "127.0.0.1", "--port", testproc.Itoa(b.port),
		"--file", b.file, "--oldstyle", "-v")
	b.proc.Stderr.WaitFor(t, "serving")
	p, addr := startProxy(t, b.addr(), "--oldstyle")
	ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
	defer cancel()
	c, err := nbd.Dial(ctx, "tcp", addr, nil)
	require.NoError(t, err)
	defer c.Close()
	assert.True(t, c.Session().Oldstyle, "the proxy greets oldstyle")
	data := bytes.Repeat([]byte("old"), 1000)
	require.NoError(t, c.Write(ctx, data, 4096, 0))
	got := make([]byte, len(data))
	require.NoError(t, c.Read(ctx, got, 4096, 0))
	assert.Equal(t, data, got)
	require.NoError(t, c.Flush(ctx))
	assert.Contains(t, p.Stderr.Text(), "does not take fences", "an oldstyle server cannot be fenced")
}
