package nbd

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// tcpPipe is a loopback TCP connection: sendfile needs a real socket.
func tcpPipe(t *testing.T) (client, server net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	client, err = net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	server = <-accepted
	require.NotNil(t, server)
	// Small socket buffers: a megabyte then takes many sendfile calls,
	// each resuming where the last stopped.
	require.NoError(t, client.(*net.TCPConn).SetWriteBuffer(64<<10))
	require.NoError(t, server.(*net.TCPConn).SetReadBuffer(64<<10))
	bound(t, client, server)
	return client, server
}

func payloadFile(t *testing.T, p []byte) *os.File {
	t.Helper()
	path := filepath.Join(t.TempDir(), "payload")
	require.NoError(t, os.WriteFile(path, p, 0o600))
	f, err := os.Open(path)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

func TestClientWriteFile(t *testing.T) {
	data := pattern(0, 3<<20)
	f := payloadFile(t, data)
	cc, sc := tcpPipe(t)
	c, s := newClientPairOn(t, cc, sc, ClientOptions{}, testServerConfig())
	require.True(t, c.CanSendFile())

	// Two writes in flight together: each header must be followed by its
	// own payload, whole, taken from the file at the offset asked for.
	pieces := []struct {
		fileOff int64
		n       uint32
		off     uint64
	}{{4096, 1 << 20, 1 << 20}, {2<<20 + 512, 1000, 512}, {0, 0, 0}}
	chs := make([]<-chan result, len(pieces))
	for i, p := range pieces {
		chs[i] = async(func() error {
			return c.WriteFile(context.Background(), f, p.fileOff, p.n, p.off, CmdFlagFUA)
		})
	}
	for range pieces {
		req := s.request()
		assert.Equal(t, CmdWrite, req.Type)
		assert.Equal(t, CmdFlagFUA, req.Flags)
		var want []byte
		for _, p := range pieces {
			if p.off == req.Offset {
				assert.Equal(t, p.n, req.Length)
				want = data[p.fileOff : p.fileOff+int64(p.n)]
			}
		}
		got := make([]byte, req.Length)
		_, err := io.ReadFull(s.r, got)
		require.NoError(t, err)
		assert.Equal(t, want, got, "payload of the write at %d", req.Offset)
		s.send(AppendSimpleReply(nil, 0, req.Cookie))
	}
	for _, ch := range chs {
		assert.NoError(t, wait(t, ch).err)
	}
	// The file's own offset is untouched: other readers share it.
	pos, err := f.Seek(0, io.SeekCurrent)
	require.NoError(t, err)
	assert.Zero(t, pos)
}

// A file shorter than the payload cannot be padded: the server would take
// the next request for data. The connection breaks instead.
func TestClientWriteFileShortFile(t *testing.T) {
	f := payloadFile(t, pattern(0, 4096))
	cc, sc := tcpPipe(t)
	c, s := newClientPairOn(t, cc, sc, ClientOptions{}, testServerConfig())
	err := c.WriteFile(context.Background(), f, 0, 8192, 0, 0)
	require.ErrorIs(t, err, io.ErrUnexpectedEOF)
	require.Error(t, c.Err(), "the client is unusable after a short payload")
	req := s.request()
	assert.Equal(t, uint32(8192), req.Length)
	got := make([]byte, 4096)
	_, err = io.ReadFull(s.r, got)
	require.NoError(t, err)
	assert.True(t, s.hungUp(), "the client hangs up after a short payload")
}

func TestClientWriteFileNeedsSocket(t *testing.T) {
	c, _ := newClientPair(t, ClientOptions{})
	assert.False(t, c.CanSendFile())
	err := c.WriteFile(context.Background(), payloadFile(t, []byte{1}), 0, 1, 0, 0)
	assert.ErrorIs(t, err, ErrNoSendFile)
}
