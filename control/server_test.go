package control_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/internal/latency"
)

var baseStatus = control.StatusInfo{
	PID: 4242, Size: 1 << 30, ClientsAllowed: true, NumClients: 3, HasControl: true,
	Uptime: 90 * time.Second, BytesRead: 11, BytesWritten: 22, Requests: 33, Errors: 4,
	ConnectionsSeen: 5, ConnectionsRejected: 1,
	Migration: control.MigrationStatus{
		BytesPerSecond: 1000, Duration: 7 * time.Second, SecondsLeft: 60, BytesLeft: 60000,
		SpeedLimit: control.NoSpeedLimit, Pass: 2, Mode: "copy", Attempts: 1, BytesSent: 123,
	},
}

const migrationExtras = "migration_pass=2 migration_mode=copy migration_attempts=1 migration_bytes_sent=123 "

const baseExtras = "uptime=90 bytes_read=11 bytes_written=22 requests=33 errors=4 connections_seen=5 connections_rejected=1 "

// TestConversation pins every command's reply, byte for byte, and what the
// handler was asked to do.
func TestConversation(t *testing.T) {
	tests := []struct {
		name      string
		mirroring bool
		completed bool
		mirrorErr error
		limit     uint64 // migration speed limit shown in status
		request   string
		reply     string
		check     func(t *testing.T, h *fakeHandler)
	}{
		{name: "status", request: "status\n\n",
			reply: "0: pid=4242 size=1073741824 is_mirroring=false clients_allowed=true num_clients=3 has_control=true " + baseExtras + "\n"},
		{name: "status while mirroring without a limit", mirroring: true, limit: control.NoSpeedLimit, request: "status\n\n",
			reply: "0: pid=4242 size=1073741824 is_mirroring=true clients_allowed=true num_clients=3 has_control=true " +
				"migration_speed=1000 migration_duration=7 migration_seconds_left=60 migration_bytes_left=60000 " + migrationExtras + baseExtras + "\n"},
		{name: "status while mirroring with a limit", mirroring: true, limit: 5000, request: "status\n\n",
			reply: "0: pid=4242 size=1073741824 is_mirroring=true clients_allowed=true num_clients=3 has_control=true " +
				"migration_speed=1000 migration_duration=7 migration_seconds_left=60 migration_bytes_left=60000 " +
				"migration_speed_limit=5000 " + migrationExtras + baseExtras + "\n"},
		{name: "status ended by end of input", request: "status\n",
			reply: "0: pid=4242 size=1073741824 is_mirroring=false clients_allowed=true num_clients=3 has_control=true " + baseExtras + "\n"},
		{name: "status with CRLF lines", request: "status\r\n\r\n",
			reply: "0: pid=4242 size=1073741824 is_mirroring=false clients_allowed=true num_clients=3 has_control=true " + baseExtras + "\n"},

		{name: "acl replaces the list", request: "acl\n127.0.0.1\n10.0.0.0/8\n\n", reply: "0: updated\n",
			check: func(t *testing.T, h *fakeHandler) { assert.Equal(t, []string{"127.0.0.1", "10.0.0.0/8"}, h.acl) }},
		{name: "acl with no entries", request: "acl\n\n", reply: "0: updated\n",
			check: func(t *testing.T, h *fakeHandler) { assert.Empty(t, h.acl); assert.Equal(t, 1, h.aclSet) }},
		{name: "acl with a bad entry", request: "acl\n127.0.0.1\n300.1.1.1\n\n", reply: "1: bad spec: 300.1.1.1\n",
			check: func(t *testing.T, h *fakeHandler) { assert.Zero(t, h.aclSet) }},

		{name: "upstream on a server", request: "upstream\n127.0.0.1:10809\n\n", reply: "1: not a proxy\n"},
		{name: "upstream without addresses", request: "upstream\n\n", reply: "1: upstream takes at least one address\n"},

		{name: "break without a mirror", request: "break\n\n", reply: "1: not mirroring\n"},
		{name: "break while mirroring", mirroring: true, request: "break\n\n", reply: "0: mirror stopped\n",
			check: func(t *testing.T, h *fakeHandler) { assert.False(t, h.mirroring) }},
		{name: "break after completion", mirroring: true, completed: true, request: "break\n\n", reply: "1: mirror completed\n"},

		{name: "mirror_max_bps without a mirror", request: "mirror_max_bps\n100\n\n", reply: "1: Not currently mirroring\n"},
		{name: "mirror_max_bps bad value without a mirror", request: "mirror_max_bps\nfast\n\n", reply: "1: Not currently mirroring\n"},
		{name: "mirror_max_bps", mirroring: true, request: "mirror_max_bps\n123456\n\n", reply: "0: updated\n",
			check: func(t *testing.T, h *fakeHandler) { assert.Equal(t, uint64(123456), h.speed) }},
		{name: "mirror_max_bps zero", mirroring: true, request: "mirror_max_bps\n0\n\n", reply: "0: updated\n"},
		{name: "mirror_max_bps not a number", mirroring: true, request: "mirror_max_bps\nfast\n\n", reply: "1: Bad format\n"},
		{name: "mirror_max_bps negative", mirroring: true, request: "mirror_max_bps\n-5\n\n", reply: "1: Bad format\n"},
		{name: "mirror_max_bps missing value", mirroring: true, request: "mirror_max_bps\n\n", reply: "1: Bad format\n"},
		{name: "mirror_max_bps two values", mirroring: true, request: "mirror_max_bps\n1\n2\n\n", reply: "1: Bad format\n"},
		{name: "mirror_max_bps too large", mirroring: true, request: "mirror_max_bps\n18446744073709551616\n\n",
			reply: "1: max_bps out of range\n"},

		{name: "mirror defaults", request: "mirror\n192.0.2.1\n4777\n\n", reply: "0: Mirror started\n",
			check: func(t *testing.T, h *fakeHandler) {
				assert.Equal(t, &control.MirrorRequest{
					Target: netip.MustParseAddrPort("192.0.2.1:4777"), Action: control.ActionExit,
					MaxBytesPerSecond: control.NoSpeedLimit,
				}, h.mirrorReq)
			}},
		{name: "mirror every parameter", request: "mirror\n2001:db8::1\n4777\nunlink\n2001:db8::2\n1000000\n\n", reply: "0: Mirror started\n",
			check: func(t *testing.T, h *fakeHandler) {
				assert.Equal(t, &control.MirrorRequest{
					Target: netip.MustParseAddrPort("[2001:db8::1]:4777"), Action: control.ActionUnlink,
					Bind: netip.MustParseAddr("2001:db8::2"), MaxBytesPerSecond: 1000000,
				}, h.mirrorReq)
			}},
		{name: "mirror action nothing", request: "mirror\n192.0.2.1\n4777\nnothing\n\n", reply: "0: Mirror started\n",
			check: func(t *testing.T, h *fakeHandler) { assert.Equal(t, control.ActionNothing, h.mirrorReq.Action) }},
		{name: "mirror one parameter", request: "mirror\n192.0.2.1\n\n", reply: "1: mirror takes at least two parameters\n"},
		{name: "mirror bad address", request: "mirror\nhost.example\n4777\n\n", reply: "1: bad IP address\n"},
		{name: "mirror bad port", request: "mirror\n192.0.2.1\n65536\n\n", reply: "1: bad IP port number\n"},
		{name: "mirror port zero", request: "mirror\n192.0.2.1\n0\n\n", reply: "1: bad IP port number\n"},
		{name: "mirror bad action", request: "mirror\n192.0.2.1\n4777\nproxy\n\n", reply: "1: action must be 'exit', 'unlink' or 'nothing'\n"},
		{name: "mirror bad bind", request: "mirror\n192.0.2.1\n4777\nexit\nlocalhost\n\n", reply: "1: bad bind address\n"},
		{name: "mirror bad speed", request: "mirror\n192.0.2.1\n4777\nexit\n192.0.2.2\nfast\n\n", reply: "1: max_bps couldn't be parsed\n"},
		{name: "mirror speed too large", request: "mirror\n192.0.2.1\n4777\nexit\n192.0.2.2\n99999999999999999999\n\n", reply: "1: max_bps out of range\n"},
		{name: "mirror too many parameters", request: "mirror\n192.0.2.1\n4777\nexit\n192.0.2.2\n1\nmore\n\n", reply: "1: unrecognised parameters to mirror\n",
			check: func(t *testing.T, h *fakeHandler) { assert.Nil(t, h.mirrorReq) }},
		{name: "mirror failure is worded as the C tool does", mirrorErr: fmt.Errorf("dial tcp 192.0.2.1:4777: %w", control.ErrMirrorConnect),
			request: "mirror\n192.0.2.1\n4777\n\n", reply: "1: Mirror failed to connect\n"},
		{name: "mirror already running", mirrorErr: control.ErrMirrorRunning, request: "mirror\n192.0.2.1\n4777\n\n", reply: "1: mirror already running\n"},
		{name: "mirror failure of another kind", mirrorErr: errors.New("mirror not supported by this build"),
			request: "mirror\n192.0.2.1\n4777\n\n", reply: "1: mirror not supported by this build\n"},
		{name: "error text stays on one line", mirrorErr: errors.New("first\nsecond\r\nthird"),
			request: "mirror\n192.0.2.1\n4777\n\n", reply: "1: first second  third\n"},

		{name: "no command", request: "\n", reply: "9: missing command\n"},
		{name: "nothing at all", request: "", reply: "9: missing command\n"},
		{name: "unknown command", request: "frobnicate\n\n", reply: "10: unknown command\n"},
		{name: "command names are case sensitive", request: "STATUS\n\n", reply: "10: unknown command\n"},
		{name: "unterminated last line", request: "break", reply: "1: not mirroring\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := &fakeHandler{status: baseStatus, mirroring: tt.mirroring, completed: tt.completed, mirrorErr: tt.mirrorErr}
			if tt.limit != 0 {
				h.status.Migration.SpeedLimit = tt.limit
			}
			path := startServer(t, &control.Server{Handler: h})
			require.Equal(t, tt.reply, converse(t, path, tt.request))
			if tt.check != nil {
				h.mu.Lock()
				defer h.mu.Unlock()
				tt.check(t, h)
			}
		})
	}
}

// TestStatusWhileMirrorConnects: a mirror command waiting for its
// destination must not hold up status, and gets its own reply after.
func TestStatusWhileMirrorConnects(t *testing.T) {
	h := &fakeHandler{status: baseStatus, mirrorEntered: make(chan struct{}), mirrorRelease: make(chan struct{})}
	path := startServer(t, &control.Server{Handler: h})
	client := &control.Client{Path: path, Timeout: ioTimeout}

	mirrorReply := make(chan control.Reply, 1)
	go func() {
		r, err := client.Do(context.Background(), control.CmdMirror, "192.0.2.1", "4777")
		assert.NoError(t, err)
		mirrorReply <- r
	}()
	<-h.mirrorEntered
	for i := 0; i < 3; i++ {
		r, err := client.Do(context.Background(), control.CmdStatus)
		require.NoError(t, err)
		require.Equal(t, control.CodeOK, r.Code)
		require.True(t, strings.HasPrefix(r.Message, "pid=4242 "), r.Message)
	}
	select {
	case r := <-mirrorReply:
		t.Fatalf("mirror answered before its handler returned: %v", r)
	default:
	}
	close(h.mirrorRelease)
	require.Equal(t, control.Reply{Code: 0, Message: "Mirror started"}, <-mirrorReply)
}

// TestMisbehavingPeers: a peer that stays silent, stops half way, or
// floods without a newline gets an error reply and is dropped, and the
// server goes on answering others.
func TestMisbehavingPeers(t *testing.T) {
	// The limits on size must hold however slowly the bytes arrive, so
	// only the cases about silence get a short deadline.
	const short, long = 200 * time.Millisecond, ioTimeout
	tests := []struct {
		name     string
		send     string // then the peer stays connected without sending more
		flood    int    // bytes without a newline, sent after send
		deadline time.Duration
		reply    string
	}{
		{name: "silent", deadline: short, reply: "1: timed out waiting for the request\n"},
		{name: "request without its empty line", send: "status\n", deadline: short, reply: "1: timed out waiting for the request\n"},
		{name: "half a line", send: "sta", deadline: short, reply: "1: timed out waiting for the request\n"},
		{name: "1 MiB without a newline", flood: 1 << 20, deadline: long, reply: "1: request line too long\n"},
		{name: "too many lines", send: "acl\n" + strings.Repeat("127.0.0.1\n", control.MaxRequestBytes/10+1),
			deadline: long, reply: "1: request too long\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := &fakeHandler{status: baseStatus}
			path := startServer(t, &control.Server{Handler: h, ReadTimeout: tt.deadline})

			bad, err := net.Dial("unix", path)
			require.NoError(t, err)
			defer bad.Close()
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				_, _ = io.WriteString(bad, tt.send)
				if tt.flood > 0 {
					// The server stops reading; the write then fails,
					// which is the point.
					_, _ = bad.Write(make([]byte, tt.flood))
				}
			}()

			client := &control.Client{Path: path, Timeout: ioTimeout}
			r, err := client.Do(context.Background(), control.CmdBreak)
			require.NoError(t, err)
			require.Equal(t, control.Reply{Code: 1, Message: "not mirroring"}, r)

			require.Equal(t, tt.reply, readAll(t, bad))
			bad.Close()
			wg.Wait()
			h.mu.Lock()
			defer h.mu.Unlock()
			require.Zero(t, h.aclSet, "a refused request must not reach the handler")
		})
	}
}

// TestSlowPeerDoesNotBlockOthers: while one peer is half way through its
// request, others are answered; the slow one is answered when it is done.
func TestSlowPeerDoesNotBlockOthers(t *testing.T) {
	h := &fakeHandler{status: baseStatus}
	path := startServer(t, &control.Server{Handler: h, ReadTimeout: ioTimeout})
	slow, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer slow.Close()
	_, err = io.WriteString(slow, "acl\n127.0.")
	require.NoError(t, err)

	client := &control.Client{Path: path, Timeout: ioTimeout}
	for _, cmd := range []string{control.CmdStatus, control.CmdBreak, control.CmdStatus} {
		r, err := client.Do(context.Background(), cmd)
		require.NoError(t, err)
		if cmd == control.CmdBreak {
			require.Equal(t, control.Reply{Code: 1, Message: "not mirroring"}, r)
		} else {
			require.True(t, strings.HasPrefix(r.String(), "0: pid=4242 "), r.String())
		}
	}
	h.mu.Lock()
	require.Zero(t, h.aclSet)
	h.mu.Unlock()

	_, err = io.WriteString(slow, "0.1\n\n")
	require.NoError(t, err)
	require.Equal(t, "0: updated\n", readAll(t, slow))
	h.mu.Lock()
	defer h.mu.Unlock()
	require.Equal(t, []string{"127.0.0.1"}, h.acl)
}

// TestTooManyConversations: a peer beyond MaxConns is told so at once
// rather than left waiting behind silent ones.
func TestTooManyConversations(t *testing.T) {
	h := &fakeHandler{status: baseStatus}
	path := startServer(t, &control.Server{Handler: h, MaxConns: 2, ReadTimeout: ioTimeout})
	client := &control.Client{Path: path, Timeout: ioTimeout}

	// Silent peers are displaced, oldest first, by peers with something
	// to say: status stays answerable however many idle peers there are.
	var silent []net.Conn
	for i := 0; i < 2; i++ {
		c, err := net.Dial("unix", path)
		require.NoError(t, err)
		defer c.Close()
		silent = append(silent, c)
	}
	time.Sleep(100 * time.Millisecond) // silent for longer than a newcomer's moment
	r, err := client.Do(context.Background(), control.CmdStatus)
	require.NoError(t, err)
	require.True(t, r.OK(), r.Message)
	require.Equal(t, "1: timed out waiting for the request\n", readAll(t, silent[0]), "the oldest silent peer made room")

	// A conversation running a command is never displaced: with every
	// slot busy, a newcomer is refused.
	busy := &fakeHandler{status: baseStatus, mirrorEntered: make(chan struct{}), mirrorRelease: make(chan struct{})}
	busyPath := startServer(t, &control.Server{Handler: busy, MaxConns: 1, ReadTimeout: ioTimeout})
	busyClient := &control.Client{Path: busyPath, Timeout: ioTimeout}
	go func() { _, _ = busyClient.Do(context.Background(), control.CmdMirror, "127.0.0.1", "10809") }()
	<-busy.mirrorEntered
	extra, err := net.Dial("unix", busyPath)
	require.NoError(t, err)
	defer extra.Close()
	require.Equal(t, "1: too many control connections\n", readAll(t, extra))
	close(busy.mirrorRelease)
	require.Eventually(t, func() bool {
		r, err := busyClient.Do(context.Background(), control.CmdStatus)
		return err == nil && r.OK()
	}, ioTimeout, 10*time.Millisecond)
}

// Peers that connect, say nothing and reconnect soon after they are
// dropped cannot make status fail, nor slow it more than a small factor.
func TestIdlePeersCannotLockOutStatus(t *testing.T) {
	h := &fakeHandler{status: baseStatus}
	path := startServer(t, &control.Server{Handler: h, ReadTimeout: ioTimeout})
	client := &control.Client{Path: path, Timeout: ioTimeout}
	status := func() error {
		r, err := client.Do(context.Background(), control.CmdStatus)
		if err == nil && !r.OK() {
			err = errors.New(r.Message)
		}
		return err
	}
	before := latency.Median(t, status)

	ctx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var peers atomic.Int64
	for range 40 {
		wg.Go(func() {
			for ctx.Err() == nil {
				c, err := net.Dial("unix", path)
				if err != nil {
					continue
				}
				peers.Add(1)
				// Until dropped, or for a moment: then again, after a
				// pause (without one this is a flood of connections
				// that burns this very process's CPU).
				_ = c.SetDeadline(time.Now().Add(200 * time.Millisecond))
				_, _ = io.Copy(io.Discard, c)
				c.Close()
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	defer func() { stop(); wg.Wait() }()
	require.Eventually(t, func() bool { return peers.Load() > 80 }, ioTimeout, time.Millisecond, "the peers keep coming")
	latency.Keeps(t, before, status)
}

// TestShutdown: Shutdown removes the socket file at once, lets a
// conversation in progress finish, and Serve reports ErrServerClosed.
func TestShutdown(t *testing.T) {
	h := &fakeHandler{status: baseStatus, mirrorEntered: make(chan struct{}), mirrorRelease: make(chan struct{})}
	srv := &control.Server{Handler: h}
	path := t.TempDir() + "/ctl.sock"
	l, err := control.Listen(path)
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()

	mirrorReply := make(chan control.Reply, 1)
	go func() {
		r, err := (&control.Client{Path: path, Timeout: ioTimeout}).Do(context.Background(), control.CmdMirror, "192.0.2.1", "4777")
		assert.NoError(t, err)
		mirrorReply <- r
	}()
	<-h.mirrorEntered

	shut := make(chan error, 1)
	go func() { shut <- srv.Shutdown(context.Background()) }()
	require.ErrorIs(t, <-served, control.ErrServerClosed)
	_, err = os.Lstat(path)
	require.ErrorIs(t, err, os.ErrNotExist, "socket file must go when the server stops listening")
	select {
	case err := <-shut:
		t.Fatalf("Shutdown returned %v with a conversation in progress", err)
	default:
	}
	close(h.mirrorRelease)
	require.NoError(t, <-shut)
	require.Equal(t, control.Reply{Code: 0, Message: "Mirror started"}, <-mirrorReply)
	require.ErrorIs(t, srv.Serve(l), control.ErrServerClosed, "Serve after Shutdown")
}

// TestShutdownDeadline: when ctx ends first, the Handler's context is
// cancelled, the peer is dropped and Shutdown reports ctx's error.
func TestShutdownDeadline(t *testing.T) {
	h := &fakeHandler{status: baseStatus, mirrorEntered: make(chan struct{}), mirrorRelease: make(chan struct{})}
	defer close(h.mirrorRelease)
	srv := &control.Server{Handler: h}
	path := t.TempDir() + "/ctl.sock"
	l, err := control.Listen(path)
	require.NoError(t, err)
	go func() { _ = srv.Serve(l) }()

	c, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer c.Close()
	_, err = io.WriteString(c, "mirror\n192.0.2.1\n4777\n\n")
	require.NoError(t, err)
	<-h.mirrorEntered

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	require.ErrorIs(t, srv.Shutdown(ctx), context.Canceled)
	// The handler saw its context end; the reply, if it was still
	// written before the connection closed, says why.
	out := readAll(t, c)
	require.Contains(t, []string{"", "1: shutting down\n"}, out)
}
