package nbd

import (
	"encoding/binary"
	"fmt"
)

// ProtocolError reports that the peer broke the protocol in a way that
// leaves the byte stream unusable (a bad magic, an impossible length). The
// connection must be closed; per-request failures are Errno values instead.
type ProtocolError struct {
	Msg string
}

func (e *ProtocolError) Error() string { return "nbd: protocol error: " + e.Msg }

func protocolErrorf(format string, args ...any) error {
	return &ProtocolError{Msg: fmt.Sprintf(format, args...)}
}

// Request is a transmission-phase request header. For CmdWrite, Length bytes
// of payload follow it on the wire.
type Request struct {
	Flags  CmdFlags
	Type   Cmd
	Cookie uint64
	Offset uint64
	Length uint32
}

// End returns the first byte after the request's range and whether
// Offset+Length overflowed 64 bits.
func (r *Request) End() (end uint64, ok bool) {
	end = r.Offset + uint64(r.Length)
	return end, end >= r.Offset
}

// DecodeRequest parses a request header. The only failure is a bad magic,
// after which the stream cannot be resynchronised.
func DecodeRequest(b *[RequestHeaderSize]byte) (Request, error) {
	if m := binary.BigEndian.Uint32(b[0:4]); m != magicRequest {
		return Request{}, protocolErrorf("bad request magic %#08x", m)
	}
	return Request{
		Flags:  CmdFlags(binary.BigEndian.Uint16(b[4:6])),
		Type:   Cmd(binary.BigEndian.Uint16(b[6:8])),
		Cookie: binary.BigEndian.Uint64(b[8:16]),
		Offset: binary.BigEndian.Uint64(b[16:24]),
		Length: binary.BigEndian.Uint32(b[24:28]),
	}, nil
}

// AppendRequest appends the encoded header of r to dst.
func AppendRequest(dst []byte, r Request) []byte {
	dst = binary.BigEndian.AppendUint32(dst, magicRequest)
	dst = binary.BigEndian.AppendUint16(dst, uint16(r.Flags))
	dst = binary.BigEndian.AppendUint16(dst, uint16(r.Type))
	dst = binary.BigEndian.AppendUint64(dst, r.Cookie)
	dst = binary.BigEndian.AppendUint64(dst, r.Offset)
	return binary.BigEndian.AppendUint32(dst, r.Length)
}

// AppendSimpleReply appends a simple reply header. For a successful READ
// the data follows it.
func AppendSimpleReply(dst []byte, errno Errno, cookie uint64) []byte {
	dst = binary.BigEndian.AppendUint32(dst, magicSimpleReply)
	dst = binary.BigEndian.AppendUint32(dst, uint32(errno))
	return binary.BigEndian.AppendUint64(dst, cookie)
}

// AppendChunkHeader appends a structured reply chunk header announcing
// length bytes of payload.
func AppendChunkHeader(dst []byte, flags ReplyFlags, typ ReplyType, cookie uint64, length uint32) []byte {
	dst = binary.BigEndian.AppendUint32(dst, magicStructuredReply)
	dst = binary.BigEndian.AppendUint16(dst, uint16(flags))
	dst = binary.BigEndian.AppendUint16(dst, uint16(typ))
	dst = binary.BigEndian.AppendUint64(dst, cookie)
	return binary.BigEndian.AppendUint32(dst, length)
}

// AppendOffsetDataHeader appends the header of an OFFSET_DATA chunk carrying
// dataLen bytes for offset; the caller sends the data right after it.
func AppendOffsetDataHeader(dst []byte, flags ReplyFlags, cookie, offset uint64, dataLen uint32) []byte {
	dst = AppendChunkHeader(dst, flags, ReplyTypeOffsetData, cookie, 8+dataLen)
	return binary.BigEndian.AppendUint64(dst, offset)
}

// AppendOffsetHole appends a complete OFFSET_HOLE chunk.
func AppendOffsetHole(dst []byte, flags ReplyFlags, cookie, offset uint64, size uint32) []byte {
	dst = AppendChunkHeader(dst, flags, ReplyTypeOffsetHole, cookie, 12)
	dst = binary.BigEndian.AppendUint64(dst, offset)
	return binary.BigEndian.AppendUint32(dst, size)
}

// AppendErrorChunk appends a complete ERROR chunk with an optional message
// for a human; the message is cut to MaxStringLen.
func AppendErrorChunk(dst []byte, flags ReplyFlags, cookie uint64, errno Errno, msg string) []byte {
	if len(msg) > MaxStringLen {
		msg = msg[:MaxStringLen]
	}
	dst = AppendChunkHeader(dst, flags, ReplyTypeError, cookie, uint32(6+len(msg)))
	dst = binary.BigEndian.AppendUint32(dst, uint32(errno))
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(msg)))
	return append(dst, msg...)
}

// Extent is one block status descriptor: Length bytes sharing Flags
// (StateHole, StateZero for base:allocation).
type Extent struct {
	Length uint32
	Flags  uint32
}

// AppendBlockStatus appends a complete BLOCK_STATUS chunk for one context.
func AppendBlockStatus(dst []byte, flags ReplyFlags, cookie uint64, contextID uint32, extents []Extent) []byte {
	dst = AppendChunkHeader(dst, flags, ReplyTypeBlockStatus, cookie, uint32(4+8*len(extents)))
	dst = binary.BigEndian.AppendUint32(dst, contextID)
	for _, e := range extents {
		dst = binary.BigEndian.AppendUint32(dst, e.Length)
		dst = binary.BigEndian.AppendUint32(dst, e.Flags)
	}
	return dst
}

// ReplyHeader is the decoded fixed part of either reply form. A simple reply
// has Structured false and carries Errno; a chunk carries Flags, Type and
// Length (the payload that follows).
type ReplyHeader struct {
	Structured bool
	Errno      Errno
	Flags      ReplyFlags
	Type       ReplyType
	Cookie     uint64
	Length     uint32
}

// Done reports whether this is the last message of its reply.
func (h *ReplyHeader) Done() bool { return !h.Structured || h.Flags&ReplyFlagDone != 0 }

// ReplyMagicKind tells from the first four bytes of a reply how long its
// header is: SimpleReplyHeaderSize, ChunkHeaderSize, or 0 for a bad magic.
func ReplyMagicKind(b []byte) int {
	switch binary.BigEndian.Uint32(b) {
	case magicSimpleReply:
		return SimpleReplyHeaderSize
	case magicStructuredReply:
		return ChunkHeaderSize
	}
	return 0
}

// DecodeReplyHeader parses a header whose length ReplyMagicKind gave.
func DecodeReplyHeader(b []byte) (ReplyHeader, error) {
	switch {
	case len(b) == SimpleReplyHeaderSize && binary.BigEndian.Uint32(b) == magicSimpleReply:
		return ReplyHeader{
			Errno:  Errno(binary.BigEndian.Uint32(b[4:8])),
			Cookie: binary.BigEndian.Uint64(b[8:16]),
		}, nil
	case len(b) == ChunkHeaderSize && binary.BigEndian.Uint32(b) == magicStructuredReply:
		return ReplyHeader{
			Structured: true,
			Flags:      ReplyFlags(binary.BigEndian.Uint16(b[4:6])),
			Type:       ReplyType(binary.BigEndian.Uint16(b[6:8])),
			Cookie:     binary.BigEndian.Uint64(b[8:16]),
			Length:     binary.BigEndian.Uint32(b[16:20]),
		}, nil
	}
	return ReplyHeader{}, protocolErrorf("bad reply magic %#08x", binary.BigEndian.Uint32(b))
}
