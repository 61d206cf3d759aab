package nbd

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// requestCases are the request headers the codec tests and the fuzz seeds
// share: every command, every flag, and the extremes of each field.
var requestCases = []struct {
	name string
	req  Request
}{
	{"read", Request{Type: CmdRead, Cookie: 1, Offset: 4096, Length: 512}},
	{"write fua", Request{Flags: CmdFlagFUA, Type: CmdWrite, Cookie: 2, Offset: 1 << 40, Length: 1 << 20}},
	{"disc", Request{Type: CmdDisc}},
	{"flush", Request{Type: CmdFlush, Cookie: 3}},
	{"trim", Request{Type: CmdTrim, Cookie: 4, Offset: 8192, Length: 65536}},
	{"cache", Request{Type: CmdCache, Cookie: 5, Offset: 0, Length: 4096}},
	{"write zeroes", Request{Flags: CmdFlagNoHole | CmdFlagFastZero, Type: CmdWriteZeroes, Cookie: 6, Length: 1 << 30}},
	{"block status", Request{Flags: CmdFlagReqOne, Type: CmdBlockStatus, Cookie: 7, Length: math.MaxUint32}},
	{"read df", Request{Flags: CmdFlagDF, Type: CmdRead, Cookie: 8, Length: DefaultMaxPayload}},
	{"all ones", Request{Flags: math.MaxUint16, Type: math.MaxUint16, Cookie: math.MaxUint64, Offset: math.MaxUint64, Length: math.MaxUint32}},
	{"unknown command", Request{Type: 200, Cookie: 0x0102030405060708}},
}

func TestRequestRoundTrip(t *testing.T) {
	for _, tt := range requestCases {
		t.Run(tt.name, func(t *testing.T) {
			b := AppendRequest(nil, tt.req)
			require.Len(t, b, RequestHeaderSize)
			got, err := DecodeRequest((*[RequestHeaderSize]byte)(b))
			require.NoError(t, err)
			assert.Equal(t, tt.req, got)
		})
	}
}

// TestRequestLayout pins the byte order and field offsets, which a round
// trip through our own decoder cannot catch.
func TestRequestLayout(t *testing.T) {
	r := Request{
		Flags:  CmdFlagFUA,
		Type:   CmdWrite,
		Cookie: 0x0102030405060708,
		Offset: 0x1112131415161718,
		Length: 0x21222324,
	}
	want := "25609513" + "0001" + "0001" + "0102030405060708" + "1112131415161718" + "21222324"
	assert.Equal(t, want, hex.EncodeToString(AppendRequest(nil, r)))

	prefix := []byte("keep")
	out := AppendRequest(prefix, r)
	assert.Equal(t, "keep", string(out[:4]), "AppendRequest must append, not overwrite")
}

func TestDecodeRequestBadMagic(t *testing.T) {
	tests := []struct {
		name  string
		magic string
	}{
		{"zero", "00000000"},
		{"simple reply magic", "67446698"},
		{"byte swapped", "13956025"},
		{"off by one bit", "25609512"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b [RequestHeaderSize]byte
			copy(b[:], AppendRequest(nil, Request{Type: CmdRead, Length: 1}))
			m, err := hex.DecodeString(tt.magic)
			require.NoError(t, err)
			copy(b[:4], m)
			_, err = DecodeRequest(&b)
			var pe *ProtocolError
			require.ErrorAs(t, err, &pe)
			assert.Contains(t, pe.Error(), "nbd: protocol error")
		})
	}
}

func TestRequestEnd(t *testing.T) {
	tests := []struct {
		name    string
		off     uint64
		length  uint32
		wantEnd uint64
		wantOK  bool
	}{
		{"start", 0, 4096, 4096, true},
		{"empty", 100, 0, 100, true},
		{"empty at the top", math.MaxUint64, 0, math.MaxUint64, true},
		{"exactly reaches the top", math.MaxUint64 - 10, 10, math.MaxUint64, true},
		{"one past the top", math.MaxUint64 - 9, 10, 0, false},
		{"wraps far", math.MaxUint64 - 1, math.MaxUint32, math.MaxUint32 - 2, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Request{Offset: tt.off, Length: tt.length}
			end, ok := r.End()
			assert.Equal(t, tt.wantOK, ok)
			if tt.wantOK {
				assert.Equal(t, tt.wantEnd, end)
			}
		})
	}
}

func TestSimpleReply(t *testing.T) {
	b := AppendSimpleReply(nil, ENOSPC, 0x0a0b0c0d0e0f1011)
	assert.Equal(t, "67446698"+"0000001c"+"0a0b0c0d0e0f1011", hex.EncodeToString(b))

	require.Equal(t, SimpleReplyHeaderSize, ReplyMagicKind(b))
	h, err := DecodeReplyHeader(b)
	require.NoError(t, err)
	assert.Equal(t, ReplyHeader{Errno: ENOSPC, Cookie: 0x0a0b0c0d0e0f1011}, h)
	assert.True(t, h.Done(), "a simple reply is always the whole reply")
}

func TestChunkHeader(t *testing.T) {
	tests := []struct {
		name     string
		flags    ReplyFlags
		typ      ReplyType
		length   uint32
		wantDone bool
	}{
		{"none done", ReplyFlagDone, ReplyTypeNone, 0, true},
		{"data more to come", 0, ReplyTypeOffsetData, 8 + 4096, false},
		{"error done", ReplyFlagDone, ReplyTypeError, 6, true},
		{"unknown flags kept", 0xfffe, ReplyTypeBlockStatus, 12, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := AppendChunkHeader(nil, tt.flags, tt.typ, 42, tt.length)
			require.Len(t, b, ChunkHeaderSize)
			assert.Equal(t, "668e33ef", hex.EncodeToString(b[:4]))
			require.Equal(t, ChunkHeaderSize, ReplyMagicKind(b))
			h, err := DecodeReplyHeader(b)
			require.NoError(t, err)
			assert.Equal(t, ReplyHeader{Structured: true, Flags: tt.flags, Type: tt.typ, Cookie: 42, Length: tt.length}, h)
			assert.Equal(t, tt.wantDone, h.Done())
		})
	}
}

func TestOffsetChunks(t *testing.T) {
	t.Run("data header", func(t *testing.T) {
		b := AppendOffsetDataHeader(nil, ReplyFlagDone, 9, 0x1000, 512)
		want := "668e33ef" + "0001" + "0001" + "0000000000000009" + "00000208" + "0000000000001000"
		assert.Equal(t, want, hex.EncodeToString(b))
	})
	t.Run("hole", func(t *testing.T) {
		b := AppendOffsetHole(nil, 0, 9, 0x2000, 0x300)
		want := "668e33ef" + "0000" + "0002" + "0000000000000009" + "0000000c" + "0000000000002000" + "00000300"
		assert.Equal(t, want, hex.EncodeToString(b))
	})
}

func TestErrorChunk(t *testing.T) {
	tests := []struct {
		name    string
		msg     string
		wantMsg string
	}{
		{"no message", "", ""},
		{"short message", "out of range", "out of range"},
		{"at the limit", strings.Repeat("a", MaxStringLen), strings.Repeat("a", MaxStringLen)},
		{"cut to the limit", strings.Repeat("b", MaxStringLen+904), strings.Repeat("b", MaxStringLen)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := AppendErrorChunk(nil, ReplyFlagDone, 77, EINVAL, tt.msg)
			require.Len(t, b, ChunkHeaderSize+6+len(tt.wantMsg))
			h, err := DecodeReplyHeader(b[:ChunkHeaderSize])
			require.NoError(t, err)
			assert.Equal(t, ReplyTypeError, h.Type)
			assert.Equal(t, uint32(6+len(tt.wantMsg)), h.Length)
			assert.True(t, h.Done())
			p := b[ChunkHeaderSize:]
			assert.Equal(t, "00000016", hex.EncodeToString(p[:4]), "errno field")
			assert.Equal(t, uint16(len(tt.wantMsg)), uint16(p[4])<<8|uint16(p[5]), "message length field")
			assert.Equal(t, tt.wantMsg, string(p[6:]))
		})
	}
}

func TestBlockStatusChunk(t *testing.T) {
	tests := []struct {
		name    string
		extents []Extent
		payload string
	}{
		{"one extent", []Extent{{Length: 4096, Flags: StateHole | StateZero}}, "00000003" + "00001000" + "00000003"},
		{"three extents", []Extent{{65536, 0}, {4096, StateZero}, {1 << 31, StateHole}},
			"00000003" + "00010000" + "00000000" + "00001000" + "00000002" + "80000000" + "00000001"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := AppendBlockStatus(nil, ReplyFlagDone, 5, 3, tt.extents)
			h, err := DecodeReplyHeader(b[:ChunkHeaderSize])
			require.NoError(t, err)
			assert.Equal(t, ReplyTypeBlockStatus, h.Type)
			assert.Equal(t, uint32(4+8*len(tt.extents)), h.Length)
			assert.Equal(t, tt.payload, hex.EncodeToString(b[ChunkHeaderSize:]))
		})
	}
}

func TestDecodeReplyHeaderErrors(t *testing.T) {
	simple := AppendSimpleReply(nil, 0, 1)
	chunk := AppendChunkHeader(nil, 0, ReplyTypeNone, 1, 0)
	tests := []struct {
		name string
		b    []byte
	}{
		{"bad magic", append([]byte{1, 2, 3, 4}, make([]byte, 12)...)},
		{"request magic", AppendRequest(nil, Request{})[:SimpleReplyHeaderSize]},
		{"simple magic with a chunk's length", append(simple, 0, 0, 0, 0)},
		{"chunk magic with a simple reply's length", chunk[:SimpleReplyHeaderSize]},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := DecodeReplyHeader(tt.b)
			var pe *ProtocolError
			assert.ErrorAs(t, err, &pe)
		})
	}
	assert.Zero(t, ReplyMagicKind([]byte{0x25, 0x60, 0x95, 0x13}), "a request magic is no reply")
}

// TestCodecAllocs holds the hot-path codecs to zero allocations: a server
// encodes one header per reply, and the garbage would add up.
func TestCodecAllocs(t *testing.T) {
	dst := make([]byte, 0, 256)
	var hdr [RequestHeaderSize]byte
	copy(hdr[:], AppendRequest(nil, requestCases[0].req))
	chunk := AppendChunkHeader(nil, ReplyFlagDone, ReplyTypeOffsetData, 1, 4104)
	extents := []Extent{{4096, 0}, {8192, StateHole}}
	var sink Request
	tests := []struct {
		name string
		f    func()
	}{
		{"AppendRequest", func() { dst = AppendRequest(dst[:0], requestCases[1].req) }},
		{"DecodeRequest", func() { sink, _ = DecodeRequest(&hdr) }},
		{"AppendSimpleReply", func() { dst = AppendSimpleReply(dst[:0], EIO, 3) }},
		{"AppendChunkHeader", func() { dst = AppendChunkHeader(dst[:0], 0, ReplyTypeNone, 3, 0) }},
		{"AppendOffsetDataHeader", func() { dst = AppendOffsetDataHeader(dst[:0], 0, 3, 4096, 4096) }},
		{"AppendOffsetHole", func() { dst = AppendOffsetHole(dst[:0], 0, 3, 4096, 4096) }},
		{"AppendErrorChunk", func() { dst = AppendErrorChunk(dst[:0], ReplyFlagDone, 3, EIO, "disk on fire") }},
		{"AppendBlockStatus", func() { dst = AppendBlockStatus(dst[:0], ReplyFlagDone, 3, 1, extents) }},
		{"DecodeReplyHeader", func() { _, _ = DecodeReplyHeader(chunk) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Zero(t, testing.AllocsPerRun(100, tt.f))
		})
	}
	_ = sink
}

func BenchmarkDecodeRequest(b *testing.B) {
	var hdr [RequestHeaderSize]byte
	copy(hdr[:], AppendRequest(nil, requestCases[1].req))
	b.SetBytes(RequestHeaderSize)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeRequest(&hdr); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAppendRequest(b *testing.B) {
	dst := make([]byte, 0, RequestHeaderSize)
	b.SetBytes(RequestHeaderSize)
	b.ReportAllocs()
	for b.Loop() {
		dst = AppendRequest(dst[:0], requestCases[1].req)
	}
}

func BenchmarkAppendSimpleReply(b *testing.B) {
	dst := make([]byte, 0, SimpleReplyHeaderSize)
	b.SetBytes(SimpleReplyHeaderSize)
	b.ReportAllocs()
	for b.Loop() {
		dst = AppendSimpleReply(dst[:0], 0, 12345)
	}
}

func BenchmarkAppendOffsetDataHeader(b *testing.B) {
	dst := make([]byte, 0, ChunkHeaderSize+8)
	b.SetBytes(ChunkHeaderSize + 8)
	b.ReportAllocs()
	for b.Loop() {
		dst = AppendOffsetDataHeader(dst[:0], ReplyFlagDone, 12345, 1<<30, 65536)
	}
}

func BenchmarkAppendBlockStatus(b *testing.B) {
	extents := make([]Extent, 16)
	for i := range extents {
		extents[i] = Extent{Length: 65536, Flags: uint32(i) & (StateHole | StateZero)}
	}
	dst := make([]byte, 0, ChunkHeaderSize+4+8*len(extents))
	b.SetBytes(int64(cap(dst)))
	b.ReportAllocs()
	for b.Loop() {
		dst = AppendBlockStatus(dst[:0], ReplyFlagDone, 12345, 1, extents)
	}
}

func BenchmarkDecodeReplyHeader(b *testing.B) {
	chunk := AppendChunkHeader(nil, ReplyFlagDone, ReplyTypeOffsetData, 1, 4104)
	b.SetBytes(ChunkHeaderSize)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeReplyHeader(chunk); err != nil {
			b.Fatal(err)
		}
	}
}

// coded is a backend error that knows its wire code, as a file backend's
// range check might.
type coded struct{ code Errno }

func (c coded) Error() string { return "coded" }
func (c coded) Errno() Errno  { return c.code }

func TestErrnoOf(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want Errno
	}{
		{"nil is success", nil, 0},
		{"errno itself", EINVAL, EINVAL},
		{"wrapped errno", fmt.Errorf("write: %w", ENOSPC), ENOSPC},
		{"server error", &ServerError{Code: EPERM, Message: "read-only"}, EPERM},
		{"wrapped server error", fmt.Errorf("mirror: %w", &ServerError{Code: EOVERFLOW}), EOVERFLOW},
		{"Errno method", fmt.Errorf("backend: %w", coded{ESHUTDOWN}), ESHUTDOWN},
		{"EPERM", syscall.EPERM, EPERM},
		{"EACCES", syscall.EACCES, EPERM},
		{"EROFS in a PathError", &os.PathError{Op: "write", Path: "/x", Err: syscall.EROFS}, EPERM},
		{"ENOMEM", syscall.ENOMEM, ENOMEM},
		{"EINVAL", syscall.EINVAL, EINVAL},
		{"ENOSPC wrapped twice", fmt.Errorf("a: %w", &os.PathError{Op: "pwrite", Path: "/x", Err: syscall.ENOSPC}), ENOSPC},
		{"EDQUOT", syscall.EDQUOT, ENOSPC},
		{"EFBIG", syscall.EFBIG, ENOSPC},
		{"EOVERFLOW", syscall.EOVERFLOW, EOVERFLOW},
		{"EOPNOTSUPP", syscall.EOPNOTSUPP, ENOTSUP},
		{"ESHUTDOWN", syscall.ESHUTDOWN, ESHUTDOWN},
		{"unmapped errno", syscall.EBADF, EIO},
		{"plain error", errors.New("something broke"), EIO},
		{"EOF", io.ErrUnexpectedEOF, EIO},
		{"context", context.DeadlineExceeded, EIO},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, ErrnoOf(tt.err))
		})
	}
}

func TestErrnoError(t *testing.T) {
	// These texts reach users in logs and in the CLI's error lines.
	tests := []struct {
		errno Errno
		want  string
	}{
		{EPERM, "nbd: operation not permitted (EPERM)"},
		{EIO, "nbd: input/output error (EIO)"},
		{ENOMEM, "nbd: cannot allocate memory (ENOMEM)"},
		{EINVAL, "nbd: invalid argument (EINVAL)"},
		{ENOSPC, "nbd: no space left on device (ENOSPC)"},
		{EOVERFLOW, "nbd: value too large (EOVERFLOW)"},
		{ENOTSUP, "nbd: operation not supported (ENOTSUP)"},
		{ESHUTDOWN, "nbd: server is shutting down (ESHUTDOWN)"},
		{EBADMSG, "nbd: bad message (EBADMSG)"},
		{Errno(99), "nbd: error 99"},
	}
	for _, tc := range tests {
		t.Run(fmt.Sprint(uint32(tc.errno)), func(t *testing.T) {
			assert.Equal(t, tc.want, tc.errno.Error())
		})
	}
}

func TestServerError(t *testing.T) {
	var err error = &ServerError{Code: EINVAL, Message: "offset not aligned"}
	assert.ErrorIs(t, err, EINVAL)
	assert.NotErrorIs(t, err, EIO)
	assert.Contains(t, err.Error(), "offset not aligned")
	assert.Contains(t, err.Error(), EINVAL.Error())
}
