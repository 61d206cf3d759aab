package server_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

const ihaveopt = 0x49484156454f5054

// option encodes a handshake option.
func option(opt nbd.Opt, length uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, ihaveopt)
	b = binary.BigEndian.AppendUint32(b, uint32(opt))
	b = binary.BigEndian.AppendUint32(b, length)
	return append(b, data...)
}

// fixedNewstyle returns the client flags of a modern client, in a new slice
// each time so that appending to it is safe.
func fixedNewstyle() []byte {
	return binary.BigEndian.AppendUint32(nil, uint32(nbd.FlagCFixedNewstyle))
}

// greeted connects and reads the newstyle greeting.
func greeted(t *testing.T, addr string) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	require.NoError(t, nc.SetDeadline(time.Now().Add(10*time.Second)))
	g := make([]byte, 18)
	_, err = io.ReadFull(nc, g)
	require.NoError(t, err)
	require.Equal(t, "NBDMAGIC", string(g[:8]))
	return nc
}

// awaitClosed reads until the server closes nc, which must happen before
// nc's deadline; it returns what was read.
func awaitClosed(t *testing.T, nc net.Conn) []byte {
	t.Helper()
	b, err := io.ReadAll(nc)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the server kept the connection open")
	}
	// A reset is fine too: the server closed with our bytes unread.
	return b
}

// Clients that negotiate badly, or not at all, lose their connection; while
// they try, a well-behaved client is served as usual.
func TestHostileHandshakesAreDropped(t *testing.T) {
	tests := []struct {
		name string
		send []byte
	}{
		{"silent", nil},
		{"garbage", pattern(1, 4096)},
		{"unknown client flags", binary.BigEndian.AppendUint32(nil, 0xffffffff)},
		{"bad option magic", append(fixedNewstyle(), pattern(2, 16)...)},
		{"huge option length, data never sent", append(fixedNewstyle(), option(999, 0xffffffff, nil)...)},
		{"huge export name", append(fixedNewstyle(), option(nbd.OptExportName, 1<<30, nil)...)},
		{"option without fixed newstyle", append(binary.BigEndian.AppendUint32(nil, 0), option(nbd.OptGo, 0, nil)...)},
		{"option cut short", append(fixedNewstyle(), option(nbd.OptGo, 100, []byte{1, 2, 3})...)},
	}
	inst := testserver.Start(t, testserver.Options{Config: server.Config{HandshakeTimeout: time.Second}})
	t.Run("group", func(t *testing.T) {
		for i, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				t.Parallel()
				nc := greeted(t, inst.Addr)
				if tt.send != nil {
					_, err := nc.Write(tt.send)
					require.NoError(t, err)
				}
				roundTrip(t, inst.Dial(t, nil), uint64(i)<<20, 1)
				awaitClosed(t, nc)
			})
		}
	})
	waitFor(t, "every connection to be dropped", func() bool { return inst.Server.NumClients() == 0 })
}

// An option too long to buffer is skipped and refused; the negotiation
// goes on.
func TestOversizedOptionIsRefusedNotFatal(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{})
	nc := greeted(t, inst.Addr)
	msg := append(fixedNewstyle(), option(nbd.OptList, nbd.MaxOptionLen+1, make([]byte, nbd.MaxOptionLen+1))...)
	msg = append(msg, option(nbd.OptAbort, 0, nil)...)
	go nc.Write(msg)

	rep := make([]byte, 20)
	_, err := io.ReadFull(nc, rep)
	require.NoError(t, err)
	assert.Equal(t, nbd.OptList, nbd.Opt(binary.BigEndian.Uint32(rep[8:])))
	assert.Equal(t, nbd.RepErrTooBig, nbd.Rep(binary.BigEndian.Uint32(rep[12:])))
	_, err = io.ReadFull(nc, make([]byte, binary.BigEndian.Uint32(rep[16:])))
	require.NoError(t, err)
	_, err = io.ReadFull(nc, rep)
	require.NoError(t, err, "the option after the oversized one must be answered")
	assert.Equal(t, nbd.OptAbort, nbd.Opt(binary.BigEndian.Uint32(rep[8:])))
	assert.Equal(t, nbd.RepAck, nbd.Rep(binary.BigEndian.Uint32(rep[12:])))
}

// Endless options would keep a connection in negotiation forever; after
// MaxOptions the server gives up on the client.
func TestEndlessOptionsAreCutOff(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{})
	nc := greeted(t, inst.Addr)
	const sent = 3 * nbd.MaxOptions
	msg := fixedNewstyle()
	for range sent {
		msg = append(msg, option(999, 0, nil)...)
	}
	go nc.Write(msg)
	replies := awaitClosed(t, nc)
	n := 0
	for len(replies) >= 20 {
		require.Equal(t, nbd.RepErrUnsup, nbd.Rep(binary.BigEndian.Uint32(replies[12:])), "reply %d", n)
		replies = replies[min(len(replies), 20+int(binary.BigEndian.Uint32(replies[16:]))):]
		n++
	}
	assert.Empty(t, replies, "a partial reply")
	assert.Less(t, n, sent, "the server answered every option")
	assert.LessOrEqual(t, n, nbd.MaxOptions)
	roundTrip(t, inst.Dial(t, nil), 0, 1)
}

// A client that sends requests but never reads the replies cannot pin the
// server's memory or goroutines: after WriteTimeout it is dropped, and
// others are served meanwhile.
func TestClientThatStopsReadingIsDropped(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{Config: server.Config{
		WriteTimeout:   300 * time.Millisecond,
		MaxBufferBytes: 8 << 20,
	}})
	normal := inst.Dial(t, nil)
	rc := dialRaw(t, inst.Addr)
	waitFor(t, "two clients", func() bool { return inst.Server.NumClients() == 2 })
	go func() {
		// Far more reply data than the socket buffers hold.
		for i := range 64 {
			if rc.send(nbd.Request{Type: nbd.CmdRead, Cookie: uint64(i), Length: 1 << 20}, nil) != nil {
				return
			}
		}
	}()
	roundTrip(t, normal, 0, 1)
	waitFor(t, "the stalled client to be dropped", func() bool { return inst.Server.NumClients() == 1 })
	roundTrip(t, normal, 0, 2)
}

// Payloads of writes the backend has not finished with are held in memory;
// a client that keeps sending cannot make the server hold more than
// MaxBufferBytes of them.
func TestUnfinishedWritesStayWithinBufferBudget(t *testing.T) {
	const (
		limit  = 4 << 20
		size   = 1 << 20
		writes = 16
		at     = 16 << 20
	)
	be := wrapFile(t)
	st := newStall(t, at, at+writes*size)
	be.write = func(p []byte, off uint64, fua bool) error {
		if st.covers(off, len(p)) {
			st.hold()
		}
		return be.Backend.WriteAt(p, off, fua)
	}
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be, MaxBufferBytes: limit}})
	st.releaseBeforeShutdown(t)
	rc := dialRaw(t, inst.Addr)
	sent := make(chan error, 1)
	go func() {
		for i := range writes {
			req := nbd.Request{Type: nbd.CmdWrite, Cookie: uint64(i), Offset: at + uint64(i)*size, Length: size}
			if err := rc.send(req, pattern(uint64(i), size)); err != nil {
				sent <- err
				return
			}
		}
		sent <- nil
	}()

	st.awaitEntered(t, limit/size)
	assert.LessOrEqual(t, inst.Server.BufferBytesInUse(), limit)
	// Give a server that ignored its budget the chance to show it.
	select {
	case <-st.entered:
		t.Fatal("more write payloads in flight than the budget allows")
	case <-time.After(100 * time.Millisecond):
	}
	assert.LessOrEqual(t, inst.Server.BufferBytesInUse(), limit)

	st.Release()
	require.NoError(t, <-sent)
	require.NoError(t, rc.nc.SetReadDeadline(time.Now().Add(30*time.Second)))
	for range writes {
		h, err := rc.reply()
		require.NoError(t, err)
		require.Zero(t, h.Errno)
	}
	assert.LessOrEqual(t, st.max.Load(), int64(limit/size))
	got := make([]byte, size)
	require.NoError(t, inst.Dial(t, nil).Read(testCtx(t), got, at+(writes-1)*size, 0))
	require.Equal(t, pattern(writes-1, size), got)
}

// A WRITE whose payload never comes holds up nobody else: overlapping
// requests of other clients run at once (the write takes its place among
// them only once its payload is in), and the stalled connection is
// dropped after PayloadTimeout without progress.
func TestStalledWritePayloadHoldsNobody(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{Config: server.Config{PayloadTimeout: 2 * time.Second}})
	victim := inst.Dial(t, nil)
	roundTrip(t, victim, 0, 1)
	attacker := dialRaw(t, inst.Addr)
	waitFor(t, "two clients", func() bool { return inst.Server.NumClients() == 2 })
	// 32 MiB announced at offset 0, 4 KiB of it sent, then nothing.
	req := nbd.Request{Type: nbd.CmdWrite, Cookie: 7, Offset: 0, Length: 32 << 20}
	require.NoError(t, attacker.send(req, pattern(9, 4096)))
	waitFor(t, "the stalled write to be received", func() bool { return inst.Server.BufferBytesInUse() >= 32<<20 })

	// The victim reads and writes the very range the attacker announced.
	ctx := testCtx(t)
	buf := make([]byte, 4096)
	require.NoError(t, victim.Read(ctx, buf, 0, 0), "an overlapping read is not held behind the stalled payload")
	assert.Equal(t, pattern(1, 4096), buf[:4096])
	roundTrip(t, victim, 4096, 2)
	assert.Equal(t, 2, inst.Server.NumClients(), "served while the stalled writer was still connected")

	waitFor(t, "the stalled writer to be dropped", func() bool { return inst.Server.NumClients() == 1 })
	_, err := attacker.reply()
	assert.Error(t, err, "the stalled writer's connection is closed, unanswered")
	roundTrip(t, victim, 0, 3)
	got := make([]byte, 4096)
	require.NoError(t, victim.Read(ctx, got, 0, 0))
	assert.Equal(t, pattern(3, 4096), got[:4096], "nothing of the unfinished write landed")
}

// A payload that keeps coming, however slowly, is not cut off: the timeout
// counts time without progress.
func TestSlowWritePayloadIsAccepted(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{Config: server.Config{PayloadTimeout: 300 * time.Millisecond}})
	rc := dialRaw(t, inst.Addr)
	const size = 64 << 10
	p := pattern(4, size)
	require.NoError(t, rc.send(nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Offset: 8192, Length: size}, nil))
	for off := 0; off < size; off += 16 << 10 {
		time.Sleep(150 * time.Millisecond) // each pause within the timeout, the whole beyond it
		_, err := rc.nc.Write(p[off : off+16<<10])
		require.NoError(t, err)
	}
	require.NoError(t, rc.nc.SetReadDeadline(time.Now().Add(10*time.Second)))
	h, err := rc.reply()
	require.NoError(t, err)
	assert.Equal(t, uint64(1), h.Cookie)
	assert.Zero(t, h.Errno)
}

// floodWithoutReading sends far more READs than the socket buffers can
// answer and never reads a reply: the connection's writer blocks.
func floodWithoutReading(t *testing.T, inst *testserver.Instance) {
	t.Helper()
	rc := dialRaw(t, inst.Addr)
	go func() {
		for i := range 64 {
			if rc.send(nbd.Request{Type: nbd.CmdRead, Cookie: uint64(i), Length: 1 << 20}, nil) != nil {
				return
			}
		}
	}()
	waitFor(t, "replies to pile up", func() bool { return inst.Server.BufferBytesInUse() >= 8<<20 })
}

// Stopping the server with a client that never reads its replies drops it
// after DrainTimeout and succeeds, well before the write timeout and the
// caller's deadline.
func TestShutdownDropsClientsThatDoNotRead(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{Config: server.Config{DrainTimeout: 300 * time.Millisecond}})
	floodWithoutReading(t, inst)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	require.NoError(t, inst.Server.Shutdown(ctx), "a clean stop, not the caller's deadline")
}

// An access list that no longer admits a client that never reads its
// replies drops it after DrainTimeout, not after the write timeout.
func TestACLRevocationDropsClientsThatDoNotRead(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{Config: server.Config{DrainTimeout: 300 * time.Millisecond}})
	good := inst.Dial(t, nil)
	floodWithoutReading(t, inst)
	others, err := acl.New([]string{"10.0.0.0/8"}, false)
	require.NoError(t, err)
	inst.Server.SetACL(others)
	waitFor(t, "the revoked clients to be dropped", func() bool { return inst.Server.NumClients() == 0 })
	assert.Error(t, good.Read(testCtx(t), make([]byte, 512), 0, 0), "the revoked reading client is gone too")
}

// Beyond MaxClients a peer is closed before any greeting and counted as
// rejected; those served are not disturbed, and a place that frees up is
// taken again.
func TestMaxClientsRefusesTheExcess(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{Config: server.Config{MaxClients: 2}})
	a := inst.Dial(t, nil)
	b, err := dialName(inst.Addr, "")
	require.NoError(t, err)
	waitFor(t, "two clients", func() bool { return inst.Server.NumClients() == 2 })
	_, err = dialName(inst.Addr, "")
	require.Error(t, err, "a third client is refused")
	assert.Equal(t, 2, inst.Server.NumClients())
	roundTrip(t, a, 0, 1)
	require.NoError(t, b.Close())
	waitFor(t, "a free place", func() bool { return inst.Server.NumClients() == 1 })
	c, err := dialName(inst.Addr, "")
	require.NoError(t, err, "the freed place is taken")
	defer c.Close()
	roundTrip(t, c, 4096, 2)
}

// Clients that never read their replies cannot make the server hold more
// than MaxMemory of data between them, whatever each connection's own
// allowance; the memory comes back when they are dropped.
func TestServerWideMemoryBound(t *testing.T) {
	const limit = 4 << 20
	inst := testserver.Start(t, testserver.Options{Config: server.Config{
		MaxMemory: limit, MaxBufferBytes: 64 << 20, WriteTimeout: 500 * time.Millisecond,
	}})
	for range 3 {
		rc := dialRaw(t, inst.Addr)
		go func() {
			for i := range 64 {
				if rc.send(nbd.Request{Type: nbd.CmdRead, Cookie: uint64(i), Length: 1 << 20}, nil) != nil {
					return
				}
			}
		}()
	}
	waitFor(t, "the memory to fill", func() bool { return inst.Server.MemoryInUse() >= limit-(1<<20) })
	for range 50 {
		require.LessOrEqual(t, inst.Server.MemoryInUse(), limit)
		time.Sleep(2 * time.Millisecond)
	}
	waitFor(t, "the readers that do not read to be dropped", func() bool { return inst.Server.NumClients() == 0 })
	assert.Zero(t, inst.Server.MemoryInUse(), "all of it came back")
	good := inst.Dial(t, nil)
	roundTrip(t, good, 0, 1)
}
