package proxy

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/nbd"
)

// exportByte is the content of the fake upstreams' export at off.
func exportByte(off int) byte { return byte(off*7 + off>>12) }

// cuttingUpstream serves a 1 MiB export whose first connection sends the
// header and half of its first READ reply's payload, in bytes that are not
// the export's, and closes; later connections answer READ and FLUSH
// faithfully.
func cuttingUpstream(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	go func() {
		for first := true; ; first = false {
			nc, err := l.Accept()
			if err != nil {
				return
			}
			go serveCutting(nc, first)
		}
	}()
	return l.Addr().String()
}

func serveCutting(nc net.Conn, cut bool) {
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
		req, err := nbd.DecodeRequest(&h)
		if err != nil {
			return
		}
		reply := nbd.AppendSimpleReply(nil, 0, req.Cookie)
		if req.Type == nbd.CmdRead {
			data := make([]byte, req.Length)
			for i := range data {
				data[i] = exportByte(int(req.Offset) + i)
			}
			if cut {
				_, _ = nc.Write(append(reply, bytes.Repeat([]byte{0xee}, len(data)/2)...))
				return
			}
			reply = append(reply, data...)
		}
		if _, err := nc.Write(reply); err != nil {
			return
		}
	}
}

// An upstream that dies with a large READ's payload half sent: nothing of
// that attempt reaches the client, which gets the replayed reply whole
// and then the next reply straight after it.
func TestReadCutMidPayloadIsReplayedWhole(t *testing.T) {
	_, addr := startProxy(t, Config{Upstreams: upstream(t, cuttingUpstream(t)), Oldstyle: true, Timeout: time.Hour})
	nc := dialOldstyle(t, addr)
	const off, n = 4096, 768 << 10
	b := nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdRead, Cookie: 1, Offset: off, Length: n})
	_, err := nc.Write(b)
	require.NoError(t, err)

	var h [nbd.SimpleReplyHeaderSize]byte
	_, err = io.ReadFull(nc, h[:])
	require.NoError(t, err)
	rh, err := nbd.DecodeReplyHeader(h[:])
	require.NoError(t, err)
	require.False(t, rh.Structured)
	require.Zero(t, rh.Errno)
	require.Equal(t, uint64(1), rh.Cookie)
	got := make([]byte, n)
	_, err = io.ReadFull(nc, got)
	require.NoError(t, err)
	for i, c := range got {
		if c != exportByte(off+i) {
			t.Fatalf("byte %d of the reply is %#x, the export holds %#x", i, c, exportByte(off+i))
		}
	}

	_, err = nc.Write(nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdFlush, Cookie: 2}))
	require.NoError(t, err)
	_, err = io.ReadFull(nc, h[:])
	require.NoError(t, err)
	rh, err = nbd.DecodeReplyHeader(h[:])
	require.NoError(t, err, "the next reply follows the replayed one")
	assert.Equal(t, uint64(2), rh.Cookie)
}
