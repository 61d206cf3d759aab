package proxy

import (
	"bufio"
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
)

// These tests drive the proxy in process with a raw oldstyle client, to
// send requests in exact bursts.

const ioTimeout = 10 * time.Second

func startProxy(t *testing.T, cfg Config) (*Proxy, string) {
	t.Helper()
	p, err := New(cfg)
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- p.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_ = p.Shutdown(ctx)
		<-served
	})
	return p, l.Addr().String()
}

func upstream(t *testing.T, addr string) []Upstream {
	u, err := ParseUpstream(addr)
	require.NoError(t, err)
	return []Upstream{u}
}

// dialOldstyle connects and reads the oldstyle greeting.
func dialOldstyle(t *testing.T, addr string) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	require.NoError(t, nc.SetDeadline(time.Now().Add(ioTimeout)))
	_, err = io.ReadFull(nc, make([]byte, 152))
	require.NoError(t, err)
	return nc
}

// readReply reads a simple reply and n bytes of data; it returns the errno.
func readReply(t *testing.T, nc net.Conn, n int) nbd.Errno {
	t.Helper()
	var h [nbd.SimpleReplyHeaderSize]byte
	_, err := io.ReadFull(nc, h[:])
	require.NoError(t, err)
	errno := nbd.Errno(binary.BigEndian.Uint32(h[4:]))
	if errno == 0 && n > 0 {
		_, err = io.ReadFull(nc, make([]byte, n))
		require.NoError(t, err)
	}
	return errno
}

// More small requests in one burst than may be in flight upstream: the
// queued ones must be sent before the proxy waits for a free slot.
func TestBurstBeyondMaxInFlight(t *testing.T) {
	srv := testserver.Start(t, testserver.Options{Size: 1 << 20})
	_, addr := startProxy(t, Config{Upstreams: upstream(t, srv.Addr), Oldstyle: true, MaxInFlight: 4,
		Timeout: time.Hour})
	nc := dialOldstyle(t, addr)
	var b []byte
	for i := range 40 {
		b = nbd.AppendRequest(b, nbd.Request{Type: nbd.CmdRead, Cookie: uint64(i), Offset: uint64(i) * 4096, Length: 512})
	}
	_, err := nc.Write(b)
	require.NoError(t, err)
	for range 40 {
		require.Zero(t, readReply(t, nc, 512))
	}
}

// A write and DISC in one segment: the write is sent and answered before
// the proxy lets the client go, without waiting for a timeout.
func TestWriteThenDisc(t *testing.T) {
	srv := testserver.Start(t, testserver.Options{Size: 1 << 20})
	_, addr := startProxy(t, Config{Upstreams: upstream(t, srv.Addr), Oldstyle: true, Timeout: time.Hour})
	nc := dialOldstyle(t, addr)
	b := nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 0, Length: 512})
	b = append(b, make([]byte, 512)...)
	b = nbd.AppendRequest(b, nbd.Request{Type: nbd.CmdDisc})
	_, err := nc.Write(b)
	require.NoError(t, err)
	assert.Zero(t, readReply(t, nc, 0))
}

// greet plays a server's handshake for a 1 MiB export on nc and returns
// the reader for the requests, or nil.
func greet(nc net.Conn) *bufio.Reader {
	br := bufio.NewReader(nc)
	info := nbd.ExportInfo{Size: 1 << 20, Flags: nbd.FlagHasFlags | nbd.FlagSendFlush}
	if _, err := nbd.ServerHandshake(br, nc, &nbd.ServerConfig{
		Lookup: func(string) (nbd.ExportInfo, error) { return info, nil },
	}); err != nil {
		return nil
	}
	return br
}

// silentUpstream negotiates and then never answers; got receives a value
// for each request header it reads.
func silentUpstream(t *testing.T, got chan<- struct{}) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer nc.Close()
				br := greet(nc)
				if br == nil {
					return
				}
				var h [nbd.RequestHeaderSize]byte
				for {
					if _, err := io.ReadFull(br, h[:]); err != nil {
						return
					}
					got <- struct{}{}
				}
			}()
		}
	}()
	return l.Addr().String()
}

// Shutdown returns once its context ends even when a request is stuck in
// a server that never answers.
func TestShutdownWithSilentUpstream(t *testing.T) {
	got := make(chan struct{}, 16)
	p, err := New(Config{Upstreams: upstream(t, silentUpstream(t, got)), Oldstyle: true, Timeout: time.Hour})
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- p.Serve(l) }()
	nc := dialOldstyle(t, l.Addr().String())
	_, err = nc.Write(nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdRead, Cookie: 1, Length: 512}))
	require.NoError(t, err)
	select {
	case <-got: // the request is in the server's hands, never to be answered
	case <-time.After(ioTimeout):
		t.Fatal("the request never reached the server")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- p.Shutdown(ctx) }()
	select {
	case err := <-done:
		assert.ErrorIs(t, err, context.DeadlineExceeded)
	case <-time.After(ioTimeout):
		t.Fatal("Shutdown still blocked long after its context ended")
	}
	assert.ErrorIs(t, <-served, ErrClosed)
}

// An upstream answers a FLUSH, sends half of another reply and goes away
// for good: the answer it gave reaches the client during the outage.
func TestAnswerDeliveredWhenUpstreamDiesRightAfter(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	go func() {
		nc, err := l.Accept()
		l.Close() // the outage lasts from now on
		if err != nil {
			return
		}
		defer nc.Close()
		br := greet(nc)
		if br == nil {
			return
		}
		var h [nbd.RequestHeaderSize]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return
		}
		req, _ := nbd.DecodeRequest(&h)
		_, _ = nc.Write(append(nbd.AppendSimpleReply(nil, 0, req.Cookie), 0x67, 0x44))
	}()
	_, addr := startProxy(t, Config{Upstreams: upstream(t, l.Addr().String()), Oldstyle: true})
	nc := dialOldstyle(t, addr)
	_, err = nc.Write(nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdFlush, Cookie: 7}))
	require.NoError(t, err)
	assert.Zero(t, readReply(t, nc, 0), "the FLUSH the upstream answered")
}

// A server stopping gracefully refuses what it reads while draining with
// ESHUTDOWN; the proxy sends those requests again to the next server
// instead of passing the error on.
func TestServerShutdownRefusalsAreReplayed(t *testing.T) {
	srv := testserver.Start(t, testserver.Options{Size: 1 << 20})
	_, addr := startProxy(t, Config{Upstreams: upstream(t, srv.Addr), Oldstyle: true})
	nc := dialOldstyle(t, addr)
	require.NoError(t, nc.SetDeadline(time.Time{}))
	errs := make(chan nbd.Errno, 1024)
	replies := make(chan struct{}, 1<<16)
	go func() {
		var h [nbd.SimpleReplyHeaderSize]byte
		for {
			if _, err := io.ReadFull(nc, h[:]); err != nil {
				return
			}
			if e := nbd.Errno(binary.BigEndian.Uint32(h[4:])); e != 0 {
				errs <- e
			} else if _, err := io.ReadFull(nc, make([]byte, 512)); err != nil {
				return
			}
			replies <- struct{}{}
		}
	}()
	stop := make(chan struct{})
	stopped := make(chan struct{})
	sent := 0
	go func() {
		defer close(stopped)
		for {
			select {
			case <-stop:
				return
			default:
			}
			var b []byte
			for i := range 32 {
				b = nbd.AppendRequest(b, nbd.Request{Type: nbd.CmdRead, Cookie: uint64(sent + i), Offset: uint64(i) * 4096, Length: 512})
			}
			if _, err := nc.Write(b); err != nil {
				return
			}
			sent += 32
			time.Sleep(time.Millisecond)
		}
	}()
	time.Sleep(200 * time.Millisecond)
	ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
	defer cancel()
	require.NoError(t, srv.Server.Shutdown(ctx))
	testserver.Start(t, testserver.Options{Path: srv.Path, ListenAddr: srv.Addr})
	time.Sleep(200 * time.Millisecond)
	close(stop)
	<-stopped
	for range sent {
		select {
		case <-replies:
		case e := <-errs:
			t.Fatalf("a client saw %v across a graceful server restart", e)
		case <-time.After(ioTimeout):
			t.Fatal("requests left unanswered")
		}
	}
	select {
	case e := <-errs:
		t.Fatalf("a client saw %v", e)
	default:
	}
}
