package interop

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// TestOldstyle checks the greeting C flexnbd peers expect, byte by byte,
// then the transmission phase through a raw request and through our
// client. (qemu and libnbd no longer speak oldstyle.)
func TestOldstyle(t *testing.T) {
	const size = 8<<20 + 512
	inst := testserver.Start(t, testserver.Options{Size: size + 100, Config: server.Config{Oldstyle: true}})

	t.Run("greeting bytes", func(t *testing.T) {
		conn, err := net.DialTimeout("tcp", inst.Addr, 5*time.Second)
		require.NoError(t, err)
		defer conn.Close()
		require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
		g := make([]byte, 152)
		_, err = io.ReadFull(conn, g)
		require.NoError(t, err)
		assert.Equal(t, "NBDMAGIC", string(g[0:8]))
		assert.Equal(t, uint64(0x00420281861253), binary.BigEndian.Uint64(g[8:16]))
		assert.Equal(t, uint64(size), binary.BigEndian.Uint64(g[16:24]), "size rounded down to 512")
		flags := binary.BigEndian.Uint32(g[24:28])
		const hasFlags, readOnly, sendFlush, sendFUA = 1 << 0, 1 << 1, 1 << 2, 1 << 3
		assert.Equal(t, uint32(hasFlags|sendFlush|sendFUA), flags&(hasFlags|sendFlush|sendFUA), "flags %#x", flags)
		assert.Zero(t, flags&readOnly, "flags %#x", flags)
		assert.Zero(t, flags>>16, "flags %#x fit the 16 bits newstyle has", flags)
		assert.Equal(t, make([]byte, 124), g[28:])

		// Straight into transmission: a READ gets a simple reply.
		req := make([]byte, 28)
		binary.BigEndian.PutUint32(req[0:], 0x25609513)
		binary.BigEndian.PutUint16(req[6:], 0) // READ
		binary.BigEndian.PutUint64(req[8:], 0xfeedfacecafe)
		binary.BigEndian.PutUint64(req[16:], 4096)
		binary.BigEndian.PutUint32(req[24:], 1024)
		_, err = conn.Write(req)
		require.NoError(t, err)
		rep := make([]byte, 16+1024)
		_, err = io.ReadFull(conn, rep)
		require.NoError(t, err)
		assert.Equal(t, uint32(0x67446698), binary.BigEndian.Uint32(rep[0:]))
		assert.Zero(t, binary.BigEndian.Uint32(rep[4:]), "error field")
		assert.Equal(t, uint64(0xfeedfacecafe), binary.BigEndian.Uint64(rep[8:]))
		assert.Equal(t, make([]byte, 1024), rep[16:])
	})

	t.Run("client round trip", func(t *testing.T) {
		c := inst.Dial(t, nil)
		require.True(t, c.Session().Oldstyle)
		assert.Equal(t, uint64(size), c.Size())
		ctx := context.Background()
		data := randomBytes(t, 3<<20+77)
		const off = 1<<20 + 13
		require.NoError(t, c.Write(ctx, data, off, nbd.CmdFlagFUA))
		require.NoError(t, c.Flush(ctx))
		got := make([]byte, len(data))
		require.NoError(t, c.Read(ctx, got, off, 0))
		requireSame(t, data, got, "read back")
		requireSame(t, data, readRange(t, inst.Path, off, int64(len(data))), "file")
		// C flexnbd answers out-of-range requests with ENOSPC and keeps
		// the connection; its peers rely on both.
		err := c.Read(ctx, make([]byte, 1024), size-512, 0)
		assert.ErrorIs(t, err, nbd.ENOSPC)
		require.NoError(t, c.Read(ctx, got[:4096], off, 0))
		assert.Equal(t, data[:4096], got[:4096])
	})
}

// TestACL checks that an access list admits the listed peers and that
// everyone else is closed before the server sends a single byte.
func TestACL(t *testing.T) {
	tests := []struct {
		name    string
		listen  string
		entries []string
		from    string
		admit   bool
	}{
		{"v4 listed source", "127.0.0.1:0", []string{"127.0.0.2"}, "127.0.0.2", true},
		{"v4 unlisted source", "127.0.0.1:0", []string{"127.0.0.2"}, "127.0.0.1", false},
		{"v4 prefix", "127.0.0.1:0", []string{"10.0.0.0/8", "127.0.0.0/30"}, "127.0.0.3", true},
		{"v4 outside prefix", "127.0.0.1:0", []string{"127.0.0.0/30"}, "127.0.0.4", false},
		{"v6 bracketed entry", "[::1]:0", []string{"[::1]"}, "::1", true},
		{"v6 prefix", "[::1]:0", []string{"::/64"}, "::1", true},
		{"v6 unlisted", "[::1]:0", []string{"fd00::/8", "127.0.0.1"}, "::1", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			list, err := acl.New(tc.entries, false)
			require.NoError(t, err)
			inst := testserver.Start(t, testserver.Options{ListenAddr: tc.listen, Config: server.Config{ACL: list}})
			d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(tc.from)}}
			conn, err := d.Dial("tcp", inst.Addr)
			require.NoError(t, err, "the kernel accepts the connection either way")
			defer conn.Close()
			require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))

			if !tc.admit {
				n, err := conn.Read(make([]byte, 1))
				assert.Zero(t, n, "nothing is sent to a refused peer")
				assert.True(t, errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET),
					"the server closed the connection: %v", err)
				assert.Equal(t, uint64(1), inst.Server.Stats().Rejected)
				return
			}
			c, err := nbd.NewClient(conn, nil)
			require.NoError(t, err)
			defer c.Close()
			ctx := context.Background()
			data := randomBytes(t, 64<<10)
			require.NoError(t, c.Write(ctx, data, 4096, 0))
			got := make([]byte, len(data))
			require.NoError(t, c.Read(ctx, got, 4096, 0))
			assert.True(t, bytes.Equal(data, got))
			assert.Zero(t, inst.Server.Stats().Rejected)
		})
	}
}
