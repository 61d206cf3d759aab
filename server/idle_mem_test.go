package server_test

import (
	"encoding/binary"
	"io"
	"net"
	"runtime"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// inUse is the memory the process holds for heap objects and stacks, after
// a collection.
func inUse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse + m.StackInuse
}

// idleClient greets an oldstyle server, runs one 4 KiB read and then stays
// connected without a word, holding as little memory as it can itself.
func idleClient(t *testing.T, addr string) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	var greeting [152]byte
	_, err = io.ReadFull(nc, greeting[:])
	require.NoError(t, err)
	_, err = nc.Write(nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdRead, Cookie: 1, Length: 4096}))
	require.NoError(t, err)
	var reply [16 + 4096]byte
	_, err = io.ReadFull(nc, reply[:])
	require.NoError(t, err)
	require.Zero(t, binary.BigEndian.Uint32(reply[4:8]))
	return nc
}

// Beyond LeanAbove connections an idle connection costs the server a few
// KiB: its buffers are taken only while there is data to read.
func TestIdleConnectionsCostLittle(t *testing.T) {
	const n = 200
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Oldstyle: true, LeanAbove: 50}})
	idleClient(t, inst.Addr).Close() // warm the pools
	waitFor(t, "the warm-up client to leave", func() bool { return inst.Server.NumClients() == 0 })
	var first []net.Conn // up to the threshold: they may keep their buffers
	for range 60 {
		first = append(first, idleClient(t, inst.Addr))
	}
	defer func() {
		for _, c := range first {
			c.Close()
		}
	}()
	waitFor(t, "the first clients", func() bool { return inst.Server.NumClients() == 60 })
	before := inUse()
	conns := make([]net.Conn, n)
	for i := range conns {
		conns[i] = idleClient(t, inst.Addr)
	}
	waitFor(t, "every client", func() bool { return inst.Server.NumClients() == 60+n })
	per := (int64(inUse()) - int64(before)) / n
	t.Logf("%d bytes per idle connection (server and this test's client together)", per)
	for _, c := range conns {
		c.Close()
	}
	require.Less(t, per, int64(32<<10), "an idle connection must not hold its 128 KiB read buffer")
}
