package server_test

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// running is a server started by the test itself, for tests that stop it
// and look at what Serve returned.
type running struct {
	srv    *server.Server
	addr   string
	served chan error
	once   sync.Once
	err    error
}

func serveOn(t *testing.T, cfg server.Config) *running {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	r := &running{srv: server.New(cfg), addr: l.Addr().String(), served: make(chan error, 1)}
	go func() { r.served <- r.srv.Serve(l) }()
	t.Cleanup(func() {
		r.srv.Close()
		r.result(t)
	})
	return r
}

// result waits for Serve to return.
func (r *running) result(t *testing.T) error {
	t.Helper()
	r.once.Do(func() {
		select {
		case r.err = <-r.served:
		case <-time.After(10 * time.Second):
			r.err = errors.New("Serve did not return")
		}
	})
	return r.err
}

func (r *running) dial(t *testing.T, m mode) *nbd.Client {
	t.Helper()
	c, err := nbd.Dial(testCtx(t), "tcp", r.addr, &nbd.ClientOptions{NoStructuredReplies: m.simple})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// dialFrom connects from a chosen loopback address, to look like another host.
func dialFrom(t *testing.T, ip, addr string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}, Timeout: 10 * time.Second}
	nc, err := d.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	return nc
}

// NumClients is what `status` reports as num_clients: every connected
// client, busy or idle or still negotiating, and it drops as they leave.
func TestNumClientsCountsConnectedClients(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{})
	count := func(n int) func() bool { return func() bool { return inst.Server.NumClients() == n } }
	require.Zero(t, inst.Server.NumClients())

	var clients []*nbd.Client
	for _, m := range []mode{structuredMode, simpleMode, structuredMode} {
		clients = append(clients, m.dial(t, inst))
	}
	waitFor(t, "three idle clients", count(3))
	negotiating, err := net.Dial("tcp", inst.Addr)
	require.NoError(t, err)
	waitFor(t, "a client still negotiating", count(4))
	assert.Equal(t, 4, inst.Server.Stats().Clients)

	for i, c := range clients {
		require.NoError(t, c.Close())
		waitFor(t, "a departed client to be dropped", count(3-i))
	}
	negotiating.Close()
	waitFor(t, "the negotiating client to be dropped", count(0))
	assert.EqualValues(t, 4, inst.Server.Stats().ConnectionsSeen)
}

// Shutdown finishes and answers what clients already asked, refuses the
// rest, makes the export durable and ends Serve.
func TestShutdownFinishesInFlightRequests(t *testing.T) {
	const stuckAt = 32 << 20
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			be, st := stalledReads(t, stuckAt, stuckAt+1<<20)
			want := pattern(1, 4096)
			require.NoError(t, be.Backend.WriteAt(want, stuckAt, false))
			var syncs atomic.Int32
			be.sync = func() error {
				syncs.Add(1)
				return be.Backend.Sync()
			}
			r := serveOn(t, server.Config{Backend: be, Oldstyle: m.oldstyle})
			st.releaseBeforeShutdown(t)
			c := r.dial(t, m)
			ctx := testCtx(t)

			got := make([]byte, 4096)
			inFlight := make(chan error, 1)
			go func() { inFlight <- c.Read(ctx, got, stuckAt, 0) }()
			st.awaitEntered(t, 1)

			shutdown := make(chan error, 1)
			go func() { shutdown <- r.srv.Shutdown(ctx) }()
			waitFor(t, "the connection to drain", func() bool { return r.srv.DrainingClients() == 1 })
			_, err := net.Dial("tcp", r.addr)
			require.Error(t, err, "a shutting-down server must not accept clients")

			late := make(chan error, 1)
			go func() { late <- c.Read(ctx, make([]byte, 512), 0, 0) }()
			require.Zero(t, syncs.Load(), "synced before the in-flight request finished")

			st.Release()
			require.NoError(t, <-inFlight, "a request received before Shutdown must be answered")
			require.Equal(t, want, got)
			require.NoError(t, <-shutdown)
			err = <-late
			require.Error(t, err, "a request after Shutdown must not succeed")
			if !errors.Is(err, nbd.ESHUTDOWN) {
				require.Error(t, c.Err(), "want ESHUTDOWN or a closed connection, got %v", err)
			}
			require.ErrorIs(t, r.result(t), server.ErrServerClosed)
			assert.Positive(t, syncs.Load(), "Shutdown must sync the export")
			assert.Zero(t, r.srv.NumClients())
		})
	}
}

// Close drops every client at once, syncs and ends Serve; a closed server
// serves no listener again.
func TestCloseDropsClientsAndStopsServing(t *testing.T) {
	var syncs atomic.Int32
	be := wrapFile(t)
	be.sync = func() error {
		syncs.Add(1)
		return be.Backend.Sync()
	}
	r := serveOn(t, server.Config{Backend: be})
	a, b := r.dial(t, structuredMode), r.dial(t, simpleMode)
	roundTrip(t, a, 0, 1)
	roundTrip(t, b, 4096, 2)

	require.NoError(t, r.srv.Close())
	require.ErrorIs(t, r.result(t), server.ErrServerClosed)
	assert.Zero(t, r.srv.NumClients())
	assert.Positive(t, syncs.Load())
	for _, c := range []*nbd.Client{a, b} {
		waitFor(t, "the client to see the connection close", func() bool { return c.Err() != nil })
		require.Error(t, c.Read(testCtx(t), make([]byte, 512), 0, 0))
	}
	_, err := net.Dial("tcp", r.addr)
	require.Error(t, err)

	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	require.ErrorIs(t, r.srv.Serve(l), server.ErrServerClosed)
	_, err = l.Accept()
	require.ErrorIs(t, err, net.ErrClosed, "Serve must close a listener it will not serve")
}

// A new access list applies to clients already connected: those it rejects
// get what they asked for answered and are then disconnected; the others do
// not notice. A rejected newcomer is closed before the greeting.
func TestSetACLDisconnectsClientsItRejects(t *testing.T) {
	const stuckAt = 32 << 20
	be, st := stalledReads(t, stuckAt, stuckAt+1<<20)
	want := pattern(3, 4096)
	require.NoError(t, be.Backend.WriteAt(want, stuckAt, false))
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be}})
	st.releaseBeforeShutdown(t)

	far, err := nbd.NewClient(dialFrom(t, "127.0.0.2", inst.Addr), nil)
	require.NoError(t, err)
	defer far.Close()
	near, err := nbd.NewClient(dialFrom(t, "127.0.0.1", inst.Addr), nil)
	require.NoError(t, err)
	defer near.Close()
	roundTrip(t, far, 0, 1)
	roundTrip(t, near, 4096, 2)

	ctx := testCtx(t)
	got := make([]byte, 4096)
	farRead := make(chan error, 1)
	go func() { farRead <- far.Read(ctx, got, stuckAt, 0) }()
	st.awaitEntered(t, 1)

	only, err := acl.New([]string{"127.0.0.1"}, false)
	require.NoError(t, err)
	inst.Server.SetACL(only)
	waitFor(t, "the rejected client to drain", func() bool { return inst.Server.DrainingClients() == 1 })
	roundTrip(t, near, 8192, 3)

	st.Release()
	require.NoError(t, <-farRead, "a request received before the ACL change must be answered")
	require.Equal(t, want, got)
	waitFor(t, "the rejected client to be disconnected", func() bool { return far.Err() != nil })
	waitFor(t, "one client left", func() bool { return inst.Server.NumClients() == 1 })
	roundTrip(t, near, 8192, 4)

	newcomer := dialFrom(t, "127.0.0.2", inst.Addr)
	require.NoError(t, newcomer.SetReadDeadline(time.Now().Add(10*time.Second)))
	greeting, err := io.ReadAll(newcomer)
	require.NoError(t, err, "a rejected peer sees a clean close")
	require.Empty(t, greeting, "a rejected peer must not get a greeting")
	assert.EqualValues(t, 1, inst.Server.Stats().Rejected)

	inst.Server.SetACL(nil)
	again, err := nbd.NewClient(dialFrom(t, "127.0.0.2", inst.Addr), nil)
	require.NoError(t, err, "a nil list admits everyone again")
	defer again.Close()
	roundTrip(t, again, 0, 5)
}

// The server judges peers by package acl's rule: a Unix-socket peer is
// local and admitted whatever the list says, at accept and when the list
// changes, while a peer whose address the list cannot judge (here a
// net.Pipe) is admitted only by a list that admits everyone.
func TestACLRuleForNonTCPPeers(t *testing.T) {
	denyAll, err := acl.New(nil, true)
	require.NoError(t, err)
	restricted, err := acl.New([]string{"127.0.0.1"}, false)
	require.NoError(t, err)
	be, err := server.OpenFile(newSparseFile(t, 1<<20), false)
	require.NoError(t, err)
	t.Cleanup(func() { be.Close() })

	t.Run("unix socket peer", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "nbd.sock")
		l, err := net.Listen("unix", sock)
		require.NoError(t, err)
		srv := serveListener(t, server.Config{Backend: be, ACL: denyAll}, l)
		c, err := nbd.Dial(testCtx(t), "unix", sock, nil)
		require.NoError(t, err, "a list that denies every address admits a local peer")
		t.Cleanup(func() { c.Close() })
		roundTrip(t, c, 0, 1)
		srv.SetACL(restricted)
		assert.Zero(t, srv.DrainingClients(), "a new list does not disconnect a local peer")
		roundTrip(t, c, 4096, 2)
	})

	t.Run("peer of another kind", func(t *testing.T) {
		pl := newPipeListener()
		srv := serveListener(t, server.Config{Backend: be, ACL: restricted}, pl)
		refused := pl.dial(t)
		greeting, err := io.ReadAll(refused)
		require.NoError(t, err)
		require.Empty(t, greeting, "a non-empty list admits no address it cannot judge")
		assert.EqualValues(t, 1, srv.Stats().Rejected)

		srv.SetACL(nil)
		c, err := nbd.NewClient(pl.dial(t), nil)
		require.NoError(t, err, "a nil list admits everyone")
		t.Cleanup(func() { c.Close() })
		roundTrip(t, c, 0, 3)
		srv.SetACL(restricted)
		waitFor(t, "the client to be disconnected", func() bool { return c.Err() != nil })
	})
}

// serveListener serves l until the test ends.
func serveListener(t *testing.T, cfg server.Config, l net.Listener) *server.Server {
	t.Helper()
	srv := server.New(cfg)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Close()
		assert.ErrorIs(t, <-served, server.ErrServerClosed)
	})
	return srv
}

// pipeListener accepts the server ends of net.Pipe connections, whose
// addresses are neither TCP nor Unix ones.
type pipeListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newPipeListener() *pipeListener {
	return &pipeListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

// dial returns the client end of a new connection once it was accepted,
// with a deadline so that a server that never answers fails the test.
func (l *pipeListener) dial(t *testing.T) net.Conn {
	t.Helper()
	client, srv := net.Pipe()
	t.Cleanup(func() { client.Close() })
	require.NoError(t, client.SetDeadline(time.Now().Add(10*time.Second)))
	select {
	case l.conns <- srv:
	case <-time.After(10 * time.Second):
		t.Fatal("the server did not accept")
	}
	return client
}

func (l *pipeListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *pipeListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *pipeListener) Addr() net.Addr { return pipeAddr{} }

type pipeAddr struct{}

func (pipeAddr) Network() string { return "pipe" }
func (pipeAddr) String() string  { return "pipe" }

// DropClients disconnects everyone, negotiating clients too, and returns
// once they are gone; the server keeps accepting.
func TestDropClientsDisconnectsEveryone(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{})
	a, b := inst.Dial(t, nil), simpleMode.dial(t, inst)
	idle := dialRaw(t, inst.Addr)
	negotiating, err := net.Dial("tcp", inst.Addr)
	require.NoError(t, err)
	defer negotiating.Close()
	waitFor(t, "four clients", func() bool { return inst.Server.NumClients() == 4 })

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	require.NoError(t, inst.Server.DropClients(ctx))
	assert.Zero(t, inst.Server.NumClients(), "DropClients returns once they are gone")
	for _, c := range []*nbd.Client{a, b} {
		waitFor(t, "the client to see the connection close", func() bool { return c.Err() != nil })
	}
	for _, nc := range []net.Conn{idle.nc, negotiating} {
		require.NoError(t, nc.SetReadDeadline(time.Now().Add(10*time.Second)))
		_, err := io.Copy(io.Discard, nc)
		require.NoError(t, err, "the server must close the connection")
	}
	roundTrip(t, inst.Dial(t, nil), 0, 1)
}

type span struct{ off, length uint64 }

// The write hook sees every change to the export before the client hears
// it is done (a mirror relies on that), and nothing else.
func TestWriteHookSeesEveryChange(t *testing.T) {
	var mu sync.Mutex
	var seen []span
	hook := func(off, length uint64) {
		mu.Lock()
		seen = append(seen, span{off, length})
		mu.Unlock()
	}
	taken := func() []span {
		mu.Lock()
		defer mu.Unlock()
		s := seen
		seen = nil
		return s
	}
	inst := testserver.Start(t, testserver.Options{Config: server.Config{OnWrite: hook}})
	c := inst.Dial(t, nil)
	tests := []struct {
		name string
		do   func(context.Context) error
		want []span
	}{
		{"write", func(ctx context.Context) error { return c.Write(ctx, pattern(1, 5000), 100, 0) },
			[]span{{100, 5000}}},
		{"fua write", func(ctx context.Context) error { return c.Write(ctx, pattern(2, 4096), 1<<20, nbd.CmdFlagFUA) },
			[]span{{1 << 20, 4096}}},
		{"large write", func(ctx context.Context) error { return c.Write(ctx, pattern(3, 300<<10), 2<<20, 0) },
			[]span{{2 << 20, 300 << 10}}},
		{"zeroes written as data", func(ctx context.Context) error { return c.Write(ctx, make([]byte, 8192), 5<<20, 0) },
			[]span{{5 << 20, 8192}}},
		{"trim", func(ctx context.Context) error { return c.Trim(ctx, 100, 8192, 0) }, []span{{100, 8192}}},
		{"write zeroes", func(ctx context.Context) error { return c.WriteZeroes(ctx, 3<<20, 4096, nbd.CmdFlagNoHole) },
			[]span{{3 << 20, 4096}}},
		{"read", func(ctx context.Context) error { return c.Read(ctx, make([]byte, 4096), 0, 0) }, nil},
		{"flush", func(ctx context.Context) error { return c.Flush(ctx) }, nil},
		{"cache", func(ctx context.Context) error { return c.Cache(ctx, 0, 4096) }, nil},
		{"block status", func(ctx context.Context) error { _, err := c.BlockStatus(ctx, 0, 4096, 0); return err }, nil},
		{"refused write", func(ctx context.Context) error {
			if err := c.Write(ctx, pattern(4, 4096), exportSize, 0); !errors.Is(err, nbd.ENOSPC) {
				return errors.New("write past the end was not refused")
			}
			return nil
		}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.NoError(t, tt.do(testCtx(t)))
			assert.Equal(t, tt.want, taken(), "hook calls by the time the reply arrived")
		})
	}

	var secondCalls atomic.Int32
	inst.Server.SetWriteHook(func(off, length uint64) {
		if off == 7 && length == 10 {
			secondCalls.Add(1)
		}
	})
	require.NoError(t, c.Write(testCtx(t), pattern(5, 10), 7, 0))
	assert.Empty(t, taken(), "the replaced hook must not be called")
	assert.EqualValues(t, 1, secondCalls.Load())

	inst.Server.SetWriteHook(nil)
	require.NoError(t, c.Write(testCtx(t), pattern(6, 10), 7, 0))
	assert.Empty(t, taken())
	assert.EqualValues(t, 1, secondCalls.Load(), "a removed hook must not be called")
}
