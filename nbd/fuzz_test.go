package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

func FuzzDecodeRequest(f *testing.F) {
	for _, tt := range requestCases {
		f.Add(AppendRequest(nil, tt.req))
	}
	bad := AppendRequest(nil, requestCases[0].req)
	bad[3] ^= 1
	f.Add(bad)

	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) < RequestHeaderSize {
			b = append(b, make([]byte, RequestHeaderSize-len(b))...)
		}
		hdr := (*[RequestHeaderSize]byte)(b[:RequestHeaderSize])
		req, err := DecodeRequest(hdr)
		if binary.BigEndian.Uint32(b) != magicRequest {
			var pe *ProtocolError
			require.ErrorAs(t, err, &pe)
			// The same fields behind a good magic must decode.
			fixed := *hdr
			binary.BigEndian.PutUint32(fixed[:], magicRequest)
			req, err = DecodeRequest(&fixed)
			hdr = &fixed
		}
		require.NoError(t, err)
		require.Equal(t, hdr[:], AppendRequest(nil, req), "encode(decode(b)) != b")

		again, err := DecodeRequest((*[RequestHeaderSize]byte)(AppendRequest(nil, req)))
		require.NoError(t, err)
		require.Equal(t, req, again, "decode(encode(x)) != x")

		end, ok := req.End()
		require.Equal(t, req.Offset <= math.MaxUint64-uint64(req.Length), ok, "overflow of %+v", req)
		if ok {
			require.Equal(t, req.Offset+uint64(req.Length), end)
		}
	})
}

// handshakeSeeds are client byte streams that reach each part of the
// server handshake.
func handshakeSeeds() [][]byte {
	flags := func(f ClientFlags) []byte { return binary.BigEndian.AppendUint32(nil, uint32(f)) }
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	fixed := flags(FlagCFixedNewstyle | FlagCNoZeroes)
	tooBig := optionBytes(OptInfo, nil)
	binary.BigEndian.PutUint32(tooBig[12:], MaxOptionLen+100)
	return [][]byte{
		cat(fixed, optionBytes(OptGo, infoData("disk"))),
		cat(fixed, optionBytes(OptStructuredReply, nil),
			optionBytes(OptSetMetaContext, metaData("disk", MetaContextBaseAllocation)),
			optionBytes(OptGo, infoData("disk", InfoBlockSize))),
		cat(flags(0), optionBytes(OptExportName, []byte("other"))),
		cat(flags(FlagCFixedNewstyle), optionBytes(OptList, nil), optionBytes(OptAbort, nil)),
		cat(fixed, optionBytes(OptInfo, infoData("disk", InfoName, InfoDescription)),
			optionBytes(OptInfo, []byte{0, 0, 0, 9}), optionBytes(OptGo, infoData("missing"))),
		cat(fixed, optionBytes(OptStructuredReply, nil),
			optionBytes(OptListMetaContext, metaData("disk", "base:")),
			optionBytes(OptListMetaContext, metaData("disk")),
			optionBytes(OptExportName, []byte("disk"))),
		cat(fixed, tooBig, make([]byte, 64)),
		cat(fixed, optionBytes(OptStartTLS, nil), optionBytes(99, []byte("x"))),
		flags(1 << 7),
		// Quoting this name in the error text used to make the reply
		// four times longer than the spec's string limit.
		cat(fixed, optionBytes(OptGo, infoData(string(make([]byte, MaxStringLen))))),
	}
}

func FuzzServerHandshake(f *testing.F) {
	for _, s := range handshakeSeeds() {
		f.Add(false, s)
	}
	f.Add(true, handshakeSeeds()[1])

	f.Fuzz(func(t *testing.T, closing bool, data []byte) {
		cfg := testServerConfig()
		if closing {
			cfg.Closing = func() bool { return true }
		}
		var out bytes.Buffer
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		ch := make(chan handshakeResult, 1)
		go func() {
			sess, err := ServerHandshake(bufio.NewReader(bytes.NewReader(data)), &out, cfg)
			ch <- handshakeResult{sess, err}
		}()
		var r handshakeResult
		select {
		case r = <-ch:
		case <-time.After(testTimeout):
			t.Fatal("ServerHandshake did not return on finite input")
		}
		runtime.ReadMemStats(&after)
		// Memory follows what the client sent, never what it claimed it
		// would send: one option buffer plus a small factor of the input.
		budget := uint64(MaxOptionLen) + 1<<20 + 64*uint64(len(data))
		require.LessOrEqual(t, after.TotalAlloc-before.TotalAlloc, budget)

		if r.err == nil {
			require.NotNil(t, r.sess)
			require.NotZero(t, r.sess.Flags&FlagHasFlags)
			if r.sess.AllocationContext != 0 {
				require.True(t, r.sess.Structured, "a context without structured replies")
			}
			require.Equal(t, r.sess.Structured, r.sess.Flags&FlagSendDF != 0)
		} else {
			require.Nil(t, r.sess)
		}
		checkServerOutput(t, out.Bytes(), r.err == nil)
	})
}

// checkServerOutput checks that what the server wrote is well framed: a
// greeting, whole option replies, and after a successful EXPORT_NAME its
// export information.
func checkServerOutput(t *testing.T, b []byte, ok bool) {
	require.GreaterOrEqual(t, len(b), 18, "greeting")
	require.Equal(t, magicIHaveOpt, binary.BigEndian.Uint64(b[8:16]))
	b = b[18:]
	for len(b) >= optReplyHeaderSize && binary.BigEndian.Uint64(b) == magicOptReply {
		n := int(binary.BigEndian.Uint32(b[16:20]))
		require.GreaterOrEqual(t, len(b), optReplyHeaderSize+n, "truncated option reply")
		typ := Rep(binary.BigEndian.Uint32(b[12:16]))
		if typ.IsError() {
			require.LessOrEqual(t, n, MaxStringLen, "error message too long")
		}
		b = b[optReplyHeaderSize+n:]
	}
	if len(b) != 0 {
		require.True(t, ok, "%d stray bytes after a failed handshake", len(b))
		require.Contains(t, []int{10, 10 + zeroPadSize}, len(b), "EXPORT_NAME reply")
	}
}

// replayConn is a connection whose server side is a recording: the
// handshake replies are served at once, the transmission replies only
// after the client sent its read request, so that the request is pending
// when they arrive.
type replayConn struct {
	hs, replies *bytes.Reader
	sent        chan struct{}
	closed      chan struct{}
	sendOnce    sync.Once
	closeOnce   sync.Once
}

func newReplayConn(hs, replies []byte) *replayConn {
	return &replayConn{
		hs:      bytes.NewReader(hs),
		replies: bytes.NewReader(replies),
		sent:    make(chan struct{}),
		closed:  make(chan struct{}),
	}
}

func (c *replayConn) Read(p []byte) (int, error) {
	if c.hs.Len() > 0 {
		return c.hs.Read(p)
	}
	select {
	case <-c.sent:
	case <-c.closed:
		return 0, net.ErrClosed
	}
	select {
	case <-c.closed:
		return 0, net.ErrClosed
	default:
		return c.replies.Read(p)
	}
}

func (c *replayConn) Write(p []byte) (int, error) {
	if len(p) >= RequestHeaderSize && binary.BigEndian.Uint32(p) == magicRequest &&
		Cmd(binary.BigEndian.Uint16(p[6:8])) == CmdRead {
		c.sendOnce.Do(func() { close(c.sent) })
	}
	return len(p), nil
}

func (c *replayConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return nil
}

func (c *replayConn) LocalAddr() net.Addr                { return &net.UnixAddr{Name: "client", Net: "unix"} }
func (c *replayConn) RemoteAddr() net.Addr               { return &net.UnixAddr{Name: "server", Net: "unix"} }
func (c *replayConn) SetDeadline(t time.Time) error      { return nil }
func (c *replayConn) SetReadDeadline(t time.Time) error  { return nil }
func (c *replayConn) SetWriteDeadline(t time.Time) error { return nil }

// fuzzContextID is the base:allocation id the recorded server grants.
const fuzzContextID = 7

// recordedHandshake is what a server says to our client's default
// negotiation: structured replies, base:allocation, then GO.
func recordedHandshake() []byte {
	b := newstyleGreeting(FlagFixedNewstyle | FlagNoZeroes)
	b = appendOptReply(b, OptStructuredReply, RepAck, nil)
	ctx := binary.BigEndian.AppendUint32(nil, fuzzContextID)
	b = appendOptReply(b, OptSetMetaContext, RepMetaContext, append(ctx, MetaContextBaseAllocation...))
	b = appendOptReply(b, OptSetMetaContext, RepAck, nil)
	info := binary.BigEndian.AppendUint16(nil, uint16(InfoExport))
	info = binary.BigEndian.AppendUint64(info, 1<<20)
	info = binary.BigEndian.AppendUint16(info, uint16(FlagHasFlags|FlagSendDF))
	b = appendOptReply(b, OptGo, RepInfo, info)
	return appendOptReply(b, OptGo, RepAck, nil)
}

func FuzzClientReplies(f *testing.F) {
	// The client's first request carries cookie 1; the read is [4096, 4160).
	const ck, off, n = 1, 4096, 64
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	seeds := [][]byte{
		cat(AppendOffsetDataHeader(nil, ReplyFlagDone, ck, off, n), pattern(off, n)),
		cat(AppendOffsetHole(nil, 0, ck, off, 32), AppendOffsetDataHeader(nil, 0, ck, off+32, 32), pattern(0, 32),
			AppendChunkHeader(nil, ReplyFlagDone, ReplyTypeNone, ck, 0)),
		AppendErrorChunk(nil, ReplyFlagDone, ck, EINVAL, "bad"),
		errorChunk(ReplyFlagDone, ReplyTypeErrorOffset, ck, EIO, "x", binary.BigEndian.AppendUint64(nil, off)),
		cat(AppendSimpleReply(nil, 0, ck), pattern(off, n)),
		AppendSimpleReply(nil, ENOSPC, ck),
		AppendOffsetDataHeader(nil, ReplyFlagDone, ck, off+n-8, 16),
		AppendOffsetHole(nil, ReplyFlagDone, ck, off-1, 2),
		AppendBlockStatus(nil, ReplyFlagDone, ck, fuzzContextID, []Extent{{n, 0}}),
		AppendSimpleReply(nil, 0, ck+1),
		nil,
	}
	for _, s := range seeds {
		f.Add(uint16(n), s)
	}
	hs := recordedHandshake()

	f.Fuzz(func(t *testing.T, length uint16, replies []byte) {
		size := int(length % 4096)
		conn := newReplayConn(hs, replies)
		c, err := NewClient(conn, &ClientOptions{HandshakeTimeout: testTimeout})
		require.NoError(t, err)
		require.Equal(t, uint32(fuzzContextID), c.Session().AllocationContext)

		const guard = 64
		backing := bytes.Repeat([]byte{0xa5}, guard+size+guard)
		buf := backing[guard : guard+size : guard+size]
		done := make(chan error, 1)
		go func() { done <- c.Read(context.Background(), buf, off, 0) }()
		select {
		case err = <-done:
		case <-time.After(testTimeout):
			t.Fatal("Read did not return on finite replies")
		}
		if err != nil {
			var pe *ProtocolError
			var code Errno
			switch {
			case errors.As(err, &pe):
			case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
			case errors.As(err, &code):
				require.NotZero(t, code)
				require.NotEqual(t, errConnLost, code, "internal marker leaked")
			default:
				t.Fatalf("unexpected kind of error %T: %v", err, err)
			}
		}
		require.Equal(t, bytes.Repeat([]byte{0xa5}, guard), backing[:guard], "write before the buffer")
		require.Equal(t, bytes.Repeat([]byte{0xa5}, guard), backing[guard+size:], "write after the buffer")
		require.NoError(t, c.Close())
	})
}
