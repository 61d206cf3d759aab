package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
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

// ReadTo and WriteFrom move a range through a stream in pieces no longer
// than the server's maximum block size, and WriteFrom takes exactly the
// bytes it was asked for from its source.
func TestClientStreams(t *testing.T) {
	const maxBlock = 64 << 10
	for _, structured := range []bool{true, false} {
		t.Run(fmt.Sprintf("structured=%v", structured), func(t *testing.T) {
			disk := make([]byte, 4<<20)
			cfg := &ServerConfig{Lookup: func(string) (ExportInfo, error) {
				return ExportInfo{Size: uint64(len(disk)), MaxBlock: maxBlock}, nil
			}}
			c, s := newClientPairFor(t, ClientOptions{NoStructuredReplies: !structured}, cfg)
			go func() {
				_ = serveMemory(s.conn, s.r, s.sess.Structured, disk, maxBlock)
				s.conn.Close()
			}()
			ctx := context.Background()

			const off, n = 12345, 9*maxBlock + 777
			want := pattern(off, n)
			src := bytes.NewReader(append(append([]byte(nil), want...), "left over"...))
			require.NoError(t, c.WriteFrom(ctx, src, off, n, 0))
			assert.Equal(t, want, disk[off:off+n], "the server's copy")
			rest, _ := io.ReadAll(src)
			assert.Equal(t, "left over", string(rest), "what WriteFrom did not need stays in the source")

			var got bytes.Buffer
			require.NoError(t, c.ReadTo(ctx, &got, off, n, 0))
			assert.Equal(t, want, got.Bytes())

			t.Run("source ends early", func(t *testing.T) {
				const at, pieces = 2 << 20, 4
				data := pattern(at+1, pieces*maxBlock)
				short := data[:2*maxBlock+100]
				err := c.WriteFrom(ctx, bytes.NewReader(short), at, pieces*maxBlock, 0)
				assert.ErrorIs(t, err, io.ErrUnexpectedEOF)
				assert.Equal(t, data[:2*maxBlock], disk[at:at+2*maxBlock], "the whole pieces before the end are written")
				assert.NotEqual(t, short[2*maxBlock:], disk[at+2*maxBlock:at+2*maxBlock+100], "a partial piece is not")

				err = c.WriteFrom(ctx, bytes.NewReader(nil), at, 1, 0)
				assert.ErrorIs(t, err, io.ErrUnexpectedEOF, "an empty source is short too")
			})

			t.Run("destination fails", func(t *testing.T) {
				w := &failingWriter{failAt: 2}
				err := c.ReadTo(ctx, w, off, n, 0)
				assert.ErrorIs(t, err, errWriterFull)
				assert.Equal(t, 2, w.calls, "nothing is written after the failure")
				assert.Equal(t, want[:maxBlock], w.got, "the pieces before it arrived in order")
			})

			t.Run("range overflows", func(t *testing.T) {
				assert.ErrorIs(t, c.ReadTo(ctx, io.Discard, 1<<63, 1<<63, 0), EINVAL)
				assert.ErrorIs(t, c.WriteFrom(ctx, bytes.NewReader(nil), 1<<63, 1<<63, 0), EINVAL)
			})
			require.NoError(t, c.Err())
		})
	}
}

var errWriterFull = errors.New("writer full")

// failingWriter keeps what it is given and fails its failAt'th Write.
type failingWriter struct {
	failAt, calls int
	got           []byte
}

func (w *failingWriter) Write(p []byte) (int, error) {
	w.calls++
	if w.calls == w.failAt {
		return 0, errWriterFull
	}
	w.got = append(w.got, p...)
	return len(p), nil
}

// ReadTo hands each piece on as soon as the pieces before it arrived, and
// WriteFrom sends each piece as soon as it has read it: neither waits for
// the whole range, and neither has more than maxPiecesInFlight pieces out.
func TestClientStreamsPieceByPiece(t *testing.T) {
	const block, pieces, off = 4096, 8, 1 << 20
	cfg := &ServerConfig{Lookup: func(string) (ExportInfo, error) {
		return ExportInfo{Size: 4 << 20, MaxBlock: block}, nil
	}}
	ctx := context.Background()

	t.Run("ReadTo", func(t *testing.T) {
		c, s := newClientPairFor(t, ClientOptions{NoStructuredReplies: true}, cfg)
		answer := func(req Request) {
			require.Equal(t, CmdRead, req.Type)
			require.Equal(t, uint32(block), req.Length)
			s.send(AppendSimpleReply(nil, 0, req.Cookie), pattern(req.Offset, block))
		}
		written := make(chan []byte, pieces)
		done := make(chan error, 1)
		go func() {
			done <- c.ReadTo(ctx, writerFunc(func(p []byte) (int, error) {
				written <- append([]byte(nil), p...)
				return len(p), nil
			}), off, pieces*block, 0)
		}()

		first := s.requests(maxPiecesInFlight)
		answer(first[off])
		select {
		case p := <-written:
			assert.Equal(t, pattern(off, block), p, "the first piece, with three still unanswered")
		case <-time.After(testTimeout):
			t.Fatal("the first piece was not written before the others arrived")
		}
		next := s.request()
		require.Equal(t, uint64(off+maxPiecesInFlight*block), next.Offset, "one piece done, one more sent")
		for i := 1; i < maxPiecesInFlight; i++ {
			answer(first[off+uint64(i*block)])
		}
		answer(next)
		for range pieces - maxPiecesInFlight - 1 {
			answer(s.request())
		}
		require.NoError(t, <-done)
		for i := 1; i < pieces; i++ {
			assert.Equal(t, pattern(off+uint64(i*block), block), <-written, "piece %d", i)
		}
	})

	t.Run("WriteFrom", func(t *testing.T) {
		c, s := newClientPairFor(t, ClientOptions{NoStructuredReplies: true}, cfg)
		data := pattern(off, pieces*block)
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() { done <- c.WriteFrom(ctx, pr, off, pieces*block, 0) }()

		_, err := pw.Write(data[:block])
		require.NoError(t, err)
		// Only the first piece has been available to read: it must
		// already be on its way.
		req := s.request()
		require.Equal(t, CmdWrite, req.Type)
		require.Equal(t, uint64(off), req.Offset)
		payload := make([]byte, req.Length)
		_, err = io.ReadFull(s.r, payload)
		require.NoError(t, err)
		assert.Equal(t, data[:block], payload)

		go func() { _, _ = pw.Write(data[block:]) }()
		s.send(AppendSimpleReply(nil, 0, req.Cookie))
		for range pieces - 1 {
			req := s.request()
			payload := make([]byte, req.Length)
			_, err := io.ReadFull(s.r, payload)
			require.NoError(t, err)
			assert.Equal(t, data[req.Offset-off:req.Offset-off+block], payload)
			s.send(AppendSimpleReply(nil, 0, req.Cookie))
		}
		require.NoError(t, <-done)
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
