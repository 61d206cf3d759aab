package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// fakeServer is the far end of a Client's connection: it completes a real
// handshake and then lets the test read requests and write replies byte
// by byte, in whatever order and shape the test wants. Its methods belong
// to the test goroutine.
type fakeServer struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
	sess *Session
}

func newClientPair(t *testing.T, opts ClientOptions) (*Client, *fakeServer) {
	t.Helper()
	return newClientPairFor(t, opts, testServerConfig())
}

// newClientPairFor is newClientPair with the server's exports given by cfg.
func newClientPairFor(t *testing.T, opts ClientOptions, cfg *ServerConfig) (*Client, *fakeServer) {
	t.Helper()
	cc, sc := pipe(t)
	return newClientPairOn(t, cc, sc, opts, cfg)
}

// newClientPairOn negotiates a Client on cc with a fake server on sc.
func newClientPairOn(t *testing.T, cc, sc net.Conn, opts ClientOptions, cfg *ServerConfig) (*Client, *fakeServer) {
	t.Helper()
	br := bufio.NewReader(sc)
	ch := make(chan handshakeResult, 1)
	go func() {
		sess, err := ServerHandshake(br, sc, cfg)
		ch <- handshakeResult{sess, err}
	}()
	c, err := NewClient(cc, &opts)
	require.NoError(t, err)
	r := waitServer(t, ch)
	require.NoError(t, r.err)
	t.Cleanup(func() {
		// Hanging up ends the client's reader; waiting for it keeps one
		// test's goroutines out of the next.
		sc.Close()
		select {
		case <-c.readerDone:
		case <-time.After(testTimeout):
			t.Error("client reader did not stop")
		}
	})
	return c, &fakeServer{t: t, conn: sc, r: br, sess: r.sess}
}

func (s *fakeServer) request() Request {
	s.t.Helper()
	var h [RequestHeaderSize]byte
	_, err := io.ReadFull(s.r, h[:])
	require.NoError(s.t, err)
	req, err := DecodeRequest(&h)
	require.NoError(s.t, err)
	return req
}

// requests reads n requests and indexes them by offset, since concurrent
// callers send them in no particular order.
func (s *fakeServer) requests(n int) map[uint64]Request {
	s.t.Helper()
	m := map[uint64]Request{}
	for range n {
		req := s.request()
		m[req.Offset] = req
	}
	require.Len(s.t, m, n, "requests with duplicate offsets")
	return m
}

func (s *fakeServer) send(b ...[]byte) {
	s.t.Helper()
	for _, p := range b {
		_, err := s.conn.Write(p)
		require.NoError(s.t, err)
	}
}

// hungUp reports whether the client closed the connection.
func (s *fakeServer) hungUp() bool {
	_, err := s.r.ReadByte()
	return errors.Is(err, io.EOF)
}

type result struct {
	extents []Extent
	err     error
}

func async(f func() error) <-chan result {
	ch := make(chan result, 1)
	go func() { ch <- result{err: f()} }()
	return ch
}

func asyncRead(c *Client, ctx context.Context, buf []byte, off uint64) <-chan result {
	return async(func() error { return c.Read(ctx, buf, off, 0) })
}

func wait(t *testing.T, ch <-chan result) result {
	t.Helper()
	select {
	case r := <-ch:
		return r
	case <-time.After(testTimeout):
		t.Fatal("client call did not return")
		return result{}
	}
}

// pattern is recognisable data for a range, so misplaced bytes show.
func pattern(off uint64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(off>>9) ^ byte(i*7+1)
	}
	return b
}

func TestClientOutOfOrderReplies(t *testing.T) {
	tests := []struct {
		name string
		opts ClientOptions
	}{
		{"simple", ClientOptions{NoStructuredReplies: true}},
		{"structured", ClientOptions{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, s := newClientPair(t, tt.opts)
			const n, size = 4, 512
			bufs := make([][]byte, n)
			chs := make([]<-chan result, n)
			for i := range n {
				bufs[i] = make([]byte, size)
				chs[i] = asyncRead(c, context.Background(), bufs[i], uint64(i)*4096)
			}
			reqs := s.requests(n)
			// Answer the last request first: only the cookie says which is which.
			for i := n - 1; i >= 0; i-- {
				off := uint64(i) * 4096
				req := reqs[off]
				require.Equal(t, CmdRead, req.Type)
				require.Equal(t, uint32(size), req.Length)
				if tt.opts.NoStructuredReplies {
					s.send(AppendSimpleReply(nil, 0, req.Cookie), pattern(off, size))
				} else {
					s.send(AppendOffsetDataHeader(nil, ReplyFlagDone, req.Cookie, off, size), pattern(off, size))
				}
			}
			for i := range n {
				require.NoError(t, wait(t, chs[i]).err)
				assert.Equal(t, pattern(uint64(i)*4096, size), bufs[i], "read %d", i)
			}
			assert.NoError(t, c.Err())
		})
	}
}

func TestClientStructuredReadAssembly(t *testing.T) {
	const off, size = 1000, 64
	want := make([]byte, size)
	copy(want[16:32], pattern(1016, 16))
	copy(want[48:64], pattern(1048, 16))
	tests := []struct {
		name   string
		chunks func(cookie uint64) [][]byte
	}{
		{"NONE ends the reply", func(ck uint64) [][]byte {
			return [][]byte{
				AppendOffsetDataHeader(nil, 0, ck, 1016, 16), pattern(1016, 16),
				AppendOffsetHole(nil, 0, ck, 1000, 16),
				AppendOffsetDataHeader(nil, 0, ck, 1048, 16), pattern(1048, 16),
				AppendOffsetHole(nil, 0, ck, 1032, 16),
				AppendChunkHeader(nil, ReplyFlagDone, ReplyTypeNone, ck, 0),
			}
		}},
		{"last content chunk is done", func(ck uint64) [][]byte {
			return [][]byte{
				AppendOffsetHole(nil, 0, ck, 1032, 16),
				AppendOffsetDataHeader(nil, 0, ck, 1048, 16), pattern(1048, 16),
				AppendOffsetHole(nil, 0, ck, 1000, 16),
				AppendOffsetDataHeader(nil, ReplyFlagDone, ck, 1016, 16), pattern(1016, 16),
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, s := newClientPair(t, ClientOptions{})
			buf := make([]byte, size)
			for i := range buf {
				buf[i] = 0xee // holes must be zeroed, not skipped
			}
			ch := asyncRead(c, context.Background(), buf, off)
			req := s.request()
			s.send(tt.chunks(req.Cookie)...)
			require.NoError(t, wait(t, ch).err)
			assert.Equal(t, want, buf)
		})
	}
}

func errorChunk(flags ReplyFlags, typ ReplyType, cookie uint64, errno Errno, msg string, extra []byte) []byte {
	b := AppendChunkHeader(nil, flags, typ, cookie, uint32(6+len(msg)+len(extra)))
	b = binary.BigEndian.AppendUint32(b, uint32(errno))
	b = binary.BigEndian.AppendUint16(b, uint16(len(msg)))
	b = append(b, msg...)
	return append(b, extra...)
}

func TestClientErrorReplies(t *testing.T) {
	tests := []struct {
		name    string
		reply   func(cookie uint64) [][]byte
		want    Errno
		wantMsg string // empty: a bare Errno, not a *ServerError
		simple  bool
	}{
		{"error chunk with message", func(ck uint64) [][]byte {
			return [][]byte{AppendErrorChunk(nil, ReplyFlagDone, ck, EINVAL, "offset not aligned")}
		}, EINVAL, "offset not aligned", false},
		{"error chunk without message", func(ck uint64) [][]byte {
			return [][]byte{AppendErrorChunk(nil, ReplyFlagDone, ck, EIO, "")}
		}, EIO, "", false},
		{"error offset chunk", func(ck uint64) [][]byte {
			return [][]byte{errorChunk(ReplyFlagDone, ReplyTypeErrorOffset, ck, EIO, "bad sector", binary.BigEndian.AppendUint64(nil, 4100))}
		}, EIO, "bad sector", false},
		{"unknown error type", func(ck uint64) [][]byte {
			return [][]byte{errorChunk(ReplyFlagDone, ReplyType(1<<15|40), ck, ENOMEM, "", nil)}
		}, ENOMEM, "", false},
		{"zero errno becomes EINVAL", func(ck uint64) [][]byte {
			return [][]byte{AppendErrorChunk(nil, ReplyFlagDone, ck, 0, "")}
		}, EINVAL, "", false},
		{"error then data then NONE", func(ck uint64) [][]byte {
			return [][]byte{
				AppendErrorChunk(nil, 0, ck, ENOSPC, "first"),
				AppendOffsetDataHeader(nil, 0, ck, 4096, 32), make([]byte, 32),
				AppendErrorChunk(nil, 0, ck, EIO, "second"),
				AppendChunkHeader(nil, ReplyFlagDone, ReplyTypeNone, ck, 0),
			}
		}, ENOSPC, "first", false},
		{"simple reply", func(ck uint64) [][]byte {
			return [][]byte{AppendSimpleReply(nil, EPERM, ck)}
		}, EPERM, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, s := newClientPair(t, ClientOptions{NoStructuredReplies: tt.simple})
			ch := asyncRead(c, context.Background(), make([]byte, 64), 4096)
			req := s.request()
			s.send(tt.reply(req.Cookie)...)
			err := wait(t, ch).err
			require.ErrorIs(t, err, tt.want)
			var se *ServerError
			if tt.wantMsg != "" {
				require.ErrorAs(t, err, &se)
				assert.Equal(t, tt.wantMsg, se.Message)
				assert.Equal(t, tt.want, se.Code)
			} else {
				assert.Equal(t, tt.want, err)
			}

			// A failed request is not a failed connection.
			assert.NoError(t, c.Err())
			ch = async(func() error { return c.Flush(context.Background()) })
			req = s.request()
			assert.Equal(t, CmdFlush, req.Type)
			s.send(AppendSimpleReply(nil, 0, req.Cookie))
			assert.NoError(t, wait(t, ch).err)
		})
	}
}

func TestClientProtocolViolations(t *testing.T) {
	// Request A reads [4096, 4160); every bad reply is aimed at it.
	const off, size = 4096, 64
	chunk := func(typ ReplyType, ck uint64, payload []byte) []byte {
		return append(AppendChunkHeader(nil, ReplyFlagDone, typ, ck, uint32(len(payload))), payload...)
	}
	tests := []struct {
		name  string
		reply func(a uint64) []byte
	}{
		{"data before the range", func(a uint64) []byte {
			return append(AppendOffsetDataHeader(nil, ReplyFlagDone, a, off-1, size), pattern(0, size)...)
		}},
		{"data past the end", func(a uint64) []byte {
			return append(AppendOffsetDataHeader(nil, ReplyFlagDone, a, off+1, size), pattern(0, size)...)
		}},
		{"data longer than the request", func(a uint64) []byte {
			return append(AppendOffsetDataHeader(nil, ReplyFlagDone, a, off, 2*size), pattern(0, 2*size)...)
		}},
		{"data at a wrapping offset", func(a uint64) []byte {
			return append(AppendOffsetDataHeader(nil, ReplyFlagDone, a, 1<<64-8, 16), pattern(0, 16)...)
		}},
		{"hole past the end", func(a uint64) []byte { return AppendOffsetHole(nil, ReplyFlagDone, a, off+32, 33) }},
		{"success describing half the read", func(a uint64) []byte {
			return append(AppendOffsetDataHeader(nil, ReplyFlagDone, a, off, size/2), pattern(0, size/2)...)
		}},
		{"NONE with nothing described", func(a uint64) []byte { return chunk(ReplyTypeNone, a, nil) }},
		{"hole of the wrong length", func(a uint64) []byte {
			return chunk(ReplyTypeOffsetHole, a, binary.BigEndian.AppendUint64(nil, off))
		}},
		{"data chunk without data", func(a uint64) []byte {
			return chunk(ReplyTypeOffsetData, a, binary.BigEndian.AppendUint64(nil, off))
		}},
		{"unknown cookie", func(a uint64) []byte { return AppendSimpleReply(nil, 0, a+1000) }},
		{"bad magic", func(uint64) []byte { return make([]byte, SimpleReplyHeaderSize) }},
		{"unknown chunk type", func(a uint64) []byte { return chunk(3, a, nil) }},
		{"NONE with a payload", func(a uint64) []byte { return chunk(ReplyTypeNone, a, []byte{0, 0, 0, 0}) }},
		{"block status for a read", func(a uint64) []byte {
			return AppendBlockStatus(nil, ReplyFlagDone, a, 1, []Extent{{size, 0}})
		}},
		{"error chunk too short", func(a uint64) []byte { return chunk(ReplyTypeError, a, []byte{0, 0, 0, 5}) }},
		{"error message overruns the chunk", func(a uint64) []byte {
			return chunk(ReplyTypeError, a, []byte{0, 0, 0, 5, 0, 10, 'x'})
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, s := newClientPair(t, ClientOptions{})
			// Guard bytes around A's buffer catch writes outside it.
			const guard = 32
			backing := make([]byte, guard+size+guard)
			for i := range backing {
				backing[i] = 0xa5
			}
			bufA := backing[guard : guard+size : guard+size]
			chA := asyncRead(c, context.Background(), bufA, off)
			chB := asyncRead(c, context.Background(), make([]byte, size), 2*off)
			reqs := s.requests(2)

			// The client may hang up halfway through the bad reply.
			_, _ = s.conn.Write(tt.reply(reqs[off].Cookie))

			var pe *ProtocolError
			assert.ErrorAs(t, wait(t, chA).err, &pe, "the request the bad reply was for")
			assert.ErrorAs(t, wait(t, chB).err, &pe, "an innocent request pending beside it")
			assert.ErrorAs(t, c.Err(), &pe)
			assert.ErrorAs(t, c.Flush(context.Background()), &pe, "later calls fail at once")
			for i := range guard {
				require.Equal(t, byte(0xa5), backing[i], "byte %d before the buffer", guard-i)
				require.Equal(t, byte(0xa5), backing[guard+size+i], "byte %d after the buffer", i)
			}
			assert.True(t, s.hungUp(), "the client must close the connection")
		})
	}
}

func TestClientCancel(t *testing.T) {
	c, s := newClientPair(t, ClientOptions{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	chA := asyncRead(c, ctx, make([]byte, 8), 0)
	chB := asyncRead(c, context.Background(), make([]byte, 8), 4096)
	s.requests(2)

	cancel()
	assert.ErrorIs(t, wait(t, chA).err, context.Canceled)
	// The server may still answer A, so the connection cannot be reused:
	// B fails too, and so does everything after.
	assert.ErrorIs(t, wait(t, chB).err, context.Canceled)
	assert.ErrorIs(t, c.Err(), context.Canceled)
	assert.Error(t, c.Flush(context.Background()))
	assert.True(t, s.hungUp())
}

func TestClientCancelBeforeSend(t *testing.T) {
	c, s := newClientPair(t, ClientOptions{MaxInFlight: 1})
	chA := asyncRead(c, context.Background(), make([]byte, 8), 0)
	reqA := s.request()

	// B waits for a slot and gives up before sending anything, which
	// leaves the connection intact.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	assert.ErrorIs(t, c.Flush(ctx), context.Canceled)

	s.send(AppendSimpleReply(nil, 0, reqA.Cookie), make([]byte, 8))
	require.NoError(t, wait(t, chA).err)
	assert.NoError(t, c.Err())
}

func TestClientClose(t *testing.T) {
	t.Run("sends DISC and hangs up", func(t *testing.T) {
		c, s := newClientPair(t, ClientOptions{})
		ch := async(c.Close)
		req := s.request()
		assert.Equal(t, CmdDisc, req.Type)
		assert.True(t, s.hungUp())
		require.NoError(t, wait(t, ch).err)
		assert.ErrorIs(t, c.Flush(context.Background()), ErrClientClosed)
	})
	t.Run("waits for requests in flight", func(t *testing.T) {
		c, s := newClientPair(t, ClientOptions{})
		chRead := asyncRead(c, context.Background(), make([]byte, 4), 0)
		req := s.request()
		chClose := async(c.Close)
		s.send(AppendSimpleReply(nil, 0, req.Cookie), []byte("data"))
		require.NoError(t, wait(t, chRead).err, "Close must not cut off a pending read")
		assert.Equal(t, CmdDisc, s.request().Type)
		require.NoError(t, wait(t, chClose).err)
	})
	t.Run("after the connection broke", func(t *testing.T) {
		c, s := newClientPair(t, ClientOptions{})
		s.conn.Close()
		select {
		case <-c.readerDone:
		case <-time.After(testTimeout):
			t.Fatal("client reader did not notice the hang-up")
		}
		assert.NoError(t, c.Close(), "nothing to say to a server that is gone")
	})
}

func TestClientRequestsOnTheWire(t *testing.T) {
	payload := pattern(0, 100)
	tests := []struct {
		name    string
		call    func(c *Client) error
		want    Request
		payload []byte
	}{
		{"write fua", func(c *Client) error { return c.Write(context.Background(), payload, 512, CmdFlagFUA) },
			Request{Type: CmdWrite, Flags: CmdFlagFUA, Offset: 512, Length: 100}, payload},
		{"flush", func(c *Client) error { return c.Flush(context.Background()) },
			Request{Type: CmdFlush}, nil},
		{"trim", func(c *Client) error { return c.Trim(context.Background(), 1<<20, 65536, 0) },
			Request{Type: CmdTrim, Offset: 1 << 20, Length: 65536}, nil},
		{"write zeroes", func(c *Client) error {
			return c.WriteZeroes(context.Background(), 8192, 4096, CmdFlagNoHole|CmdFlagFastZero)
		}, Request{Type: CmdWriteZeroes, Flags: CmdFlagNoHole | CmdFlagFastZero, Offset: 8192, Length: 4096}, nil},
		{"cache", func(c *Client) error { return c.Cache(context.Background(), 4096, 4096) },
			Request{Type: CmdCache, Offset: 4096, Length: 4096}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, s := newClientPair(t, ClientOptions{})
			ch := async(func() error { return tt.call(c) })
			req := s.request()
			assert.NotZero(t, req.Cookie)
			tt.want.Cookie = req.Cookie
			assert.Equal(t, tt.want, req)
			if tt.payload != nil {
				got := make([]byte, len(tt.payload))
				_, err := io.ReadFull(s.r, got)
				require.NoError(t, err)
				assert.Equal(t, tt.payload, got)
			}
			s.send(AppendSimpleReply(nil, 0, req.Cookie))
			assert.NoError(t, wait(t, ch).err)
		})
	}
}

func TestClientBlockStatus(t *testing.T) {
	t.Run("extents of our context", func(t *testing.T) {
		c, s := newClientPair(t, ClientOptions{})
		id := c.Session().AllocationContext
		require.NotZero(t, id)
		ch := make(chan result, 1)
		go func() {
			ext, err := c.BlockStatus(context.Background(), 0, 1<<20, CmdFlagReqOne)
			ch <- result{ext, err}
		}()
		req := s.request()
		assert.Equal(t, Request{Type: CmdBlockStatus, Flags: CmdFlagReqOne, Cookie: req.Cookie, Length: 1 << 20}, req)
		want := []Extent{{65536, StateHole | StateZero}, {4096, 0}}
		s.send(
			AppendBlockStatus(nil, 0, req.Cookie, id+1, []Extent{{1 << 20, 0}}), // someone else's context
			AppendBlockStatus(nil, ReplyFlagDone, req.Cookie, id, want),
		)
		r := wait(t, ch)
		require.NoError(t, r.err)
		assert.Equal(t, want, r.extents)
	})
	t.Run("not negotiated", func(t *testing.T) {
		c, s := newClientPair(t, ClientOptions{NoBlockStatus: true})
		_, err := c.BlockStatus(context.Background(), 0, 4096, 0)
		assert.ErrorIs(t, err, EINVAL)
		// Nothing went out: the next request the server sees is this one.
		ch := async(func() error { return c.Flush(context.Background()) })
		req := s.request()
		assert.Equal(t, CmdFlush, req.Type)
		s.send(AppendSimpleReply(nil, 0, req.Cookie))
		assert.NoError(t, wait(t, ch).err)
	})
}

func TestClientDoRejects(t *testing.T) {
	c, _ := newClientPair(t, ClientOptions{})
	_, err := c.Do(context.Background(), Request{Type: CmdDisc}, nil, nil)
	assert.Error(t, err)
	_, err = c.Do(context.Background(), Request{Type: CmdRead, Length: 10}, nil, make([]byte, 9))
	assert.Error(t, err)
	assert.NoError(t, c.Err(), "refusing a bad call must not break the connection")
}
