package server_test

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/latency"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// Each attack below is checked twice: the attacker is bounded (it holds no
// more than its limit and is dropped when it should be), and a good client
// keeps its latency, compared with the same client on the same server just
// before the attack began (see internal/latency).

// readOp is a good client's 4 KiB read at off.
func readOp(t testing.TB, c *nbd.Client, off uint64) func() error {
	buf := make([]byte, 4096)
	ctx := testCtx(t)
	return func() error { return c.Read(ctx, buf, off, 0) }
}

// connectOp is a good client that connects, reads 4 KiB and leaves: the
// whole life of a short-lived client, handshake included.
func connectOp(t testing.TB, addr string) func() error {
	buf := make([]byte, 4096)
	ctx := testCtx(t)
	return func() error {
		c, err := dialName(addr, "")
		if err != nil {
			return err
		}
		defer c.Close()
		return c.Read(ctx, buf, 0, 0)
	}
}

// A thousand connected, idle clients cost the busy one nothing it notices.
func TestIdleFloodKeepsLatency(t *testing.T) {
	const idle = 1000
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Oldstyle: true, LeanAbove: 100}})
	good, err := dialName(inst.Addr, "")
	require.NoError(t, err)
	t.Cleanup(func() { good.Close() })
	op := readOp(t, good, 8192)
	before := latency.Median(t, op)

	conns := make([]net.Conn, 0, idle)
	t.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	for range idle {
		conns = append(conns, idleClient(t, inst.Addr))
	}
	waitFor(t, "the idle clients", func() bool { return inst.Server.NumClients() == idle+1 })
	latency.Keeps(t, before, op)
	assert.Equal(t, idle+1, inst.Server.NumClients(), "idle clients are not dropped for being idle")
}

// slowHandshakes keeps up to n connections at a time that take the
// greeting and then say nothing, opening a new one a little after one is
// closed, until the test ends. It returns how many it opened. (Without
// the pause it is a connection flood, which burns the machine's CPU in
// this very process rather than holding the server's places.)
func slowHandshakes(t testing.TB, addr string, n int) func() int {
	t.Helper()
	var mu sync.Mutex
	opened := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				nc, err := net.Dial("tcp", addr)
				if err != nil {
					time.Sleep(10 * time.Millisecond)
					continue
				}
				mu.Lock()
				opened++
				mu.Unlock()
				done := make(chan struct{})
				go func() {
					select {
					case <-stop:
					case <-done:
					}
					nc.Close()
				}()
				// Read whatever the server sends until it closes.
				_, _ = io.Copy(io.Discard, nc)
				close(done)
				time.Sleep(200 * time.Millisecond)
			}
		})
	}
	t.Cleanup(func() { close(stop); wg.Wait() })
	return func() int {
		mu.Lock()
		defer mu.Unlock()
		return opened
	}
}

// Peers that open connections and never finish their handshake, as many
// as MaxClients and more, reconnecting whenever they are dropped, cannot
// keep a real client out: the oldest unfinished handshake makes way for
// a new connection. Clients already served are never displaced.
func TestSlowHandshakesCannotLockOutClients(t *testing.T) {
	// The limit is what protects a newcomer's first round trip: it is
	// displaced only if that many peers arrive before its first bytes do.
	const limit = 256
	inst := testserver.Start(t, testserver.Options{Config: server.Config{
		MaxClients: limit, HandshakeTimeout: time.Minute,
	}})
	served, err := dialName(inst.Addr, "")
	require.NoError(t, err)
	t.Cleanup(func() { served.Close() })
	op := connectOp(t, inst.Addr)
	before := latency.Median(t, op)

	opened := slowHandshakes(t, inst.Addr, limit+64)
	waitFor(t, "the server to fill up", func() bool { return inst.Server.NumClients() == limit })
	latency.Keeps(t, before, op)
	assert.LessOrEqual(t, inst.Server.NumClients(), limit, "the limit holds")
	waitFor(t, "displaced attackers to come back", func() bool { return opened() > limit+64 })
	roundTrip(t, served, 0, 1) // never displaced
}

// Clients that never read their replies hold their memory and their
// writers, not the server: a good client's reads keep their latency, and
// the non-readers stay within the server-wide budget until dropped.
func TestNonReadingClientsKeepLatency(t *testing.T) {
	const limit = 8 << 20
	inst := testserver.Start(t, testserver.Options{Config: server.Config{
		MaxMemory: limit, MaxBufferBytes: 64 << 20, WriteTimeout: time.Minute,
	}})
	good := inst.Dial(t, nil)
	op := readOp(t, good, 4096)
	before := latency.Median(t, op)
	for range 3 {
		floodWithoutReading(t, inst)
	}
	latency.Keeps(t, before, op)
	assert.LessOrEqual(t, inst.Server.MemoryInUse(), limit)
	assert.Equal(t, 4, inst.Server.NumClients(), "the non-readers are still there: they were not the reason")
}

// Behind a WRITE whose payload stopped arriving, a good client reading the
// very range it announced keeps its latency; the attacker's announced
// length is counted against the budget, and it is dropped at
// PayloadTimeout.
func TestStalledPayloadKeepsLatency(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{Config: server.Config{PayloadTimeout: time.Minute}})
	good := inst.Dial(t, nil)
	op := readOp(t, good, 0)
	before := latency.Median(t, op)
	var attackers []*rawConn
	for i := range 4 {
		a := dialRaw(t, inst.Addr)
		req := nbd.Request{Type: nbd.CmdWrite, Cookie: uint64(i), Offset: 0, Length: 32 << 20}
		require.NoError(t, a.send(req, pattern(9, 4096)))
		attackers = append(attackers, a)
	}
	waitFor(t, "the stalled writes to be received", func() bool { return inst.Server.BufferBytesInUse() >= 4*32<<20 })
	latency.Keeps(t, before, op)
	assert.Len(t, attackers, inst.Server.NumClients()-1)
}
