package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// serveMemory is a small in-memory NBD server for the transmission phase:
// it answers each request from its own goroutine, so replies overtake one
// another the way they do with a real concurrent server. Structured reads
// are split into two chunks, the second half first.
// A request longer than maxLen (when not 0) is an error.
func serveMemory(conn net.Conn, r *bufio.Reader, structured bool, disk []byte, maxLen uint32) error {
	var (
		wmu sync.Mutex // serialises replies on conn
		dmu sync.Mutex // guards disk
		wg  sync.WaitGroup
	)
	defer wg.Wait()
	reply := func(b ...[]byte) {
		wmu.Lock()
		defer wmu.Unlock()
		for _, p := range b {
			_, _ = conn.Write(p)
		}
	}
	var h [RequestHeaderSize]byte
	for {
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return fmt.Errorf("read request: %w", err)
		}
		req, err := DecodeRequest(&h)
		if err != nil {
			return err
		}
		end, ok := req.End()
		if !ok || end > uint64(len(disk)) {
			return fmt.Errorf("request [%d,+%d) outside the disk", req.Offset, req.Length)
		}
		if maxLen != 0 && req.Length > maxLen {
			return fmt.Errorf("request of %d bytes is over the maximum block size %d", req.Length, maxLen)
		}
		switch req.Type {
		case CmdDisc:
			return nil
		case CmdWrite:
			// The payload belongs to the stream, so it is read here, in order.
			p := make([]byte, req.Length)
			if _, err := io.ReadFull(r, p); err != nil {
				return fmt.Errorf("read payload: %w", err)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				dmu.Lock()
				copy(disk[req.Offset:], p)
				dmu.Unlock()
				reply(AppendSimpleReply(nil, 0, req.Cookie))
			}()
		case CmdRead:
			wg.Add(1)
			go func() {
				defer wg.Done()
				dmu.Lock()
				data := append([]byte(nil), disk[req.Offset:end]...)
				dmu.Unlock()
				if !structured {
					reply(AppendSimpleReply(nil, 0, req.Cookie), data)
					return
				}
				half := req.Length / 2
				reply(
					AppendOffsetDataHeader(nil, 0, req.Cookie, req.Offset+uint64(half), req.Length-half), data[half:],
					AppendOffsetDataHeader(nil, ReplyFlagDone, req.Cookie, req.Offset, half), data[:half],
				)
			}()
		default:
			return fmt.Errorf("unexpected command %d", req.Type)
		}
	}
}

func TestClientConcurrentUse(t *testing.T) {
	tests := []struct {
		name string
		opts ClientOptions
	}{
		{"simple", ClientOptions{NoStructuredReplies: true, MaxInFlight: 4}},
		{"structured", ClientOptions{MaxInFlight: 4}},
		{"default in-flight limit", ClientOptions{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			const workers, rounds, region, block = 8, 30, 64 << 10, 4096
			c, s := newClientPair(t, tt.opts)
			served := make(chan error, 1)
			go func() {
				err := serveMemory(s.conn, s.r, s.sess.Structured, make([]byte, workers*region), 0)
				// Hanging up also frees the workers if the server gave up early.
				s.conn.Close()
				served <- err
			}()

			var wg sync.WaitGroup
			for w := range workers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					ctx := context.Background()
					got := make([]byte, block)
					for i := range rounds {
						off := uint64(w*region + (i%(region/block))*block)
						want := make([]byte, block)
						binary.BigEndian.PutUint64(want, uint64(w)<<32|uint64(i))
						copy(want[8:], pattern(off, block-8))
						if !assert.NoError(t, c.Write(ctx, want, off, 0)) {
							return
						}
						if !assert.NoError(t, c.Read(ctx, got, off, 0)) {
							return
						}
						if !assert.Equal(t, want, got, "worker %d round %d", w, i) {
							return
						}
					}
				}()
			}
			wg.Wait()
			require.NoError(t, c.Err())
			require.NoError(t, c.Close())
			select {
			case err := <-served:
				require.NoError(t, err, "the server must see a clean disconnect")
			case <-time.After(testTimeout):
				t.Fatal("the server did not see the disconnect")
			}
		})
	}
}

// A Read or Write longer than the server's maximum block size goes out as
// several requests none of which is too long, and the data arrives whole.
func TestClientSplitsLargeTransfers(t *testing.T) {
	const maxBlock = 64 << 10
	for _, structured := range []bool{true, false} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			disk := make([]byte, 4<<20)
			cfg := &ServerConfig{Lookup: func(string) (ExportInfo, error) {
				return ExportInfo{Size: uint64(len(disk)), Flags: FlagSendFUA, MaxBlock: maxBlock}, nil
			}}
			c, s := newClientPairFor(t, ClientOptions{NoStructuredReplies: !structured}, cfg)
			require.Equal(t, uint32(maxBlock), c.Session().Export.MaxBlock)
			served := make(chan error, 1)
			go func() {
				err := serveMemory(s.conn, s.r, s.sess.Structured, disk, maxBlock)
				s.conn.Close()
				served <- err
			}()

			ctx := context.Background()
			// Not a multiple of the block size, and not aligned to it.
			const off, n = 12345, 3*maxBlock + 777
			want := pattern(off, n)
			require.NoError(t, c.Write(ctx, want, off, CmdFlagFUA))
			assert.Equal(t, want, disk[off:off+n], "the server's copy")
			got := make([]byte, n)
			require.NoError(t, c.Read(ctx, got, off, 0))
			assert.Equal(t, want, got)

			// A piece the server refuses fails the whole transfer.
			err := c.Read(ctx, make([]byte, 2*maxBlock), uint64(len(disk))-maxBlock, 0)
			assert.Error(t, err)
			select {
			case err := <-served:
				assert.ErrorContains(t, err, "outside the disk")
			case <-time.After(testTimeout):
				t.Fatal("the server did not stop")
			}
		})
	}
}
