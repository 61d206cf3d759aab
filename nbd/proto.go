package nbd

// This file pins the numbers of the NBD protocol specification
// (NetworkBlockDevice/nbd, doc/proto.md). Each block mirrors one table of
// the specification; the comment on an entry gives its spec name and, where
// there is one, the layout of its payload. proto_test.go checks every value.

// Magic numbers.
const (
	// NBDMAGIC ("NBDMAGIC"): first 8 bytes of every greeting.
	magicInitPasswd uint64 = 0x4e42444d41474943
	// IHAVEOPT: newstyle greeting magic and the prefix of every option.
	magicIHaveOpt uint64 = 0x49484156454f5054
	// cliserv_magic: oldstyle greeting magic.
	magicOldstyle uint64 = 0x00420281861253
	// Option reply magic.
	magicOptReply uint64 = 0x3e889045565a9
	// NBD_REQUEST_MAGIC.
	magicRequest uint32 = 0x25609513
	// NBD_SIMPLE_REPLY_MAGIC.
	magicSimpleReply uint32 = 0x67446698
	// NBD_STRUCTURED_REPLY_MAGIC.
	magicStructuredReply uint32 = 0x668e33ef
)

// HandshakeFlags are the 16 bits the server sends after IHAVEOPT.
type HandshakeFlags uint16

const (
	FlagFixedNewstyle HandshakeFlags = 1 << 0 // NBD_FLAG_FIXED_NEWSTYLE
	FlagNoZeroes      HandshakeFlags = 1 << 1 // NBD_FLAG_NO_ZEROES
)

// ClientFlags are the 32 bits the client answers the handshake flags with.
type ClientFlags uint32

const (
	FlagCFixedNewstyle ClientFlags = 1 << 0 // NBD_FLAG_C_FIXED_NEWSTYLE
	FlagCNoZeroes      ClientFlags = 1 << 1 // NBD_FLAG_C_NO_ZEROES
)

// TransmissionFlags describe an export: what the server will accept.
type TransmissionFlags uint16

const (
	FlagHasFlags        TransmissionFlags = 1 << 0  // NBD_FLAG_HAS_FLAGS: always set
	FlagReadOnly        TransmissionFlags = 1 << 1  // NBD_FLAG_READ_ONLY
	FlagSendFlush       TransmissionFlags = 1 << 2  // NBD_FLAG_SEND_FLUSH
	FlagSendFUA         TransmissionFlags = 1 << 3  // NBD_FLAG_SEND_FUA
	FlagRotational      TransmissionFlags = 1 << 4  // NBD_FLAG_ROTATIONAL
	FlagSendTrim        TransmissionFlags = 1 << 5  // NBD_FLAG_SEND_TRIM
	FlagSendWriteZeroes TransmissionFlags = 1 << 6  // NBD_FLAG_SEND_WRITE_ZEROES
	FlagSendDF          TransmissionFlags = 1 << 7  // NBD_FLAG_SEND_DF: only with structured replies
	FlagCanMultiConn    TransmissionFlags = 1 << 8  // NBD_FLAG_CAN_MULTI_CONN
	FlagSendResize      TransmissionFlags = 1 << 9  // NBD_FLAG_SEND_RESIZE
	FlagSendCache       TransmissionFlags = 1 << 10 // NBD_FLAG_SEND_CACHE
	FlagSendFastZero    TransmissionFlags = 1 << 11 // NBD_FLAG_SEND_FAST_ZERO
)

// Opt is an option type sent during option haggling.
type Opt uint32

const (
	OptExportName      Opt = 1  // NBD_OPT_EXPORT_NAME: data = export name
	OptAbort           Opt = 2  // NBD_OPT_ABORT: no data
	OptList            Opt = 3  // NBD_OPT_LIST: no data
	OptPeekExport      Opt = 4  // NBD_OPT_PEEK_EXPORT: withdrawn
	OptStartTLS        Opt = 5  // NBD_OPT_STARTTLS: no data
	OptInfo            Opt = 6  // NBD_OPT_INFO: u32 namelen, name, u16 n, n x u16 info
	OptGo              Opt = 7  // NBD_OPT_GO: as NBD_OPT_INFO
	OptStructuredReply Opt = 8  // NBD_OPT_STRUCTURED_REPLY: no data
	OptListMetaContext Opt = 9  // NBD_OPT_LIST_META_CONTEXT: u32 namelen, name, u32 n, n x (u32 len, query)
	OptSetMetaContext  Opt = 10 // NBD_OPT_SET_META_CONTEXT: as NBD_OPT_LIST_META_CONTEXT
	OptExtendedHeaders Opt = 11 // NBD_OPT_EXTENDED_HEADERS: not supported here

	// OptFence is flexnbd's own option ("FXF1"): u64 generation, then a
	// key of 1 to MaxFenceKey bytes. A connection with a key and a higher
	// generation replaces the server's earlier connections with that key:
	// they stop reading and finish what they read before the new one
	// starts, so a client that reconnects and sends its unanswered
	// requests again cannot be overtaken by the originals. Servers that
	// do not know it answer NBD_REP_ERR_UNSUP, as the protocol requires.
	OptFence Opt = 0x46584631
)

// MaxFenceKey bounds OptFence's key.
const MaxFenceKey = 64

// Rep is an option reply type. Error replies have bit 31 set.
type Rep uint32

const (
	RepAck         Rep = 1 // NBD_REP_ACK: no data
	RepServer      Rep = 2 // NBD_REP_SERVER: u32 namelen, name, [description]
	RepInfo        Rep = 3 // NBD_REP_INFO: u16 info type, payload
	RepMetaContext Rep = 4 // NBD_REP_META_CONTEXT: u32 context id, name

	repErrBit           Rep = 1 << 31
	RepErrUnsup         Rep = repErrBit + 1  // NBD_REP_ERR_UNSUP
	RepErrPolicy        Rep = repErrBit + 2  // NBD_REP_ERR_POLICY
	RepErrInvalid       Rep = repErrBit + 3  // NBD_REP_ERR_INVALID
	RepErrPlatform      Rep = repErrBit + 4  // NBD_REP_ERR_PLATFORM
	RepErrTLSReqd       Rep = repErrBit + 5  // NBD_REP_ERR_TLS_REQD
	RepErrUnknown       Rep = repErrBit + 6  // NBD_REP_ERR_UNKNOWN
	RepErrShutdown      Rep = repErrBit + 7  // NBD_REP_ERR_SHUTDOWN
	RepErrBlockSizeReqd Rep = repErrBit + 8  // NBD_REP_ERR_BLOCK_SIZE_REQD
	RepErrTooBig        Rep = repErrBit + 9  // NBD_REP_ERR_TOO_BIG
	RepErrExtHeaderReqd Rep = repErrBit + 10 // NBD_REP_ERR_EXT_HEADER_REQD
)

// IsError reports whether r is one of the error replies.
func (r Rep) IsError() bool { return r&repErrBit != 0 }

// Info is an information type inside NBD_REP_INFO and NBD_OPT_INFO/GO.
type Info uint16

const (
	InfoExport      Info = 0 // NBD_INFO_EXPORT: u64 size, u16 transmission flags
	InfoName        Info = 1 // NBD_INFO_NAME: name
	InfoDescription Info = 2 // NBD_INFO_DESCRIPTION: description
	InfoBlockSize   Info = 3 // NBD_INFO_BLOCK_SIZE: u32 min, u32 preferred, u32 max
)

// Cmd is a request type in the transmission phase.
type Cmd uint16

const (
	CmdRead        Cmd = 0 // NBD_CMD_READ
	CmdWrite       Cmd = 1 // NBD_CMD_WRITE: followed by length bytes of payload
	CmdDisc        Cmd = 2 // NBD_CMD_DISC: no reply
	CmdFlush       Cmd = 3 // NBD_CMD_FLUSH: offset and length zero
	CmdTrim        Cmd = 4 // NBD_CMD_TRIM
	CmdCache       Cmd = 5 // NBD_CMD_CACHE
	CmdWriteZeroes Cmd = 6 // NBD_CMD_WRITE_ZEROES
	CmdBlockStatus Cmd = 7 // NBD_CMD_BLOCK_STATUS
	CmdResize      Cmd = 8 // NBD_CMD_RESIZE: experimental, not supported here
)

// CmdFlags are the 16 request flag bits.
type CmdFlags uint16

const (
	CmdFlagFUA      CmdFlags = 1 << 0 // NBD_CMD_FLAG_FUA
	CmdFlagNoHole   CmdFlags = 1 << 1 // NBD_CMD_FLAG_NO_HOLE: WRITE_ZEROES
	CmdFlagDF       CmdFlags = 1 << 2 // NBD_CMD_FLAG_DF: READ, structured only
	CmdFlagReqOne   CmdFlags = 1 << 3 // NBD_CMD_FLAG_REQ_ONE: BLOCK_STATUS
	CmdFlagFastZero CmdFlags = 1 << 4 // NBD_CMD_FLAG_FAST_ZERO: WRITE_ZEROES
)

// ReplyFlags are the flag bits of a structured reply chunk.
type ReplyFlags uint16

const (
	ReplyFlagDone ReplyFlags = 1 << 0 // NBD_REPLY_FLAG_DONE
)

// ReplyType is the type of a structured reply chunk. Error chunks have bit
// 15 set.
type ReplyType uint16

const (
	ReplyTypeNone        ReplyType = 0 // NBD_REPLY_TYPE_NONE: no payload
	ReplyTypeOffsetData  ReplyType = 1 // NBD_REPLY_TYPE_OFFSET_DATA: u64 offset, data
	ReplyTypeOffsetHole  ReplyType = 2 // NBD_REPLY_TYPE_OFFSET_HOLE: u64 offset, u32 size
	ReplyTypeBlockStatus ReplyType = 5 // NBD_REPLY_TYPE_BLOCK_STATUS: u32 context, n x (u32 len, u32 flags)

	replyTypeErrBit      ReplyType = 1 << 15
	ReplyTypeError       ReplyType = replyTypeErrBit + 1 // NBD_REPLY_TYPE_ERROR: u32 errno, u16 msglen, msg
	ReplyTypeErrorOffset ReplyType = replyTypeErrBit + 2 // NBD_REPLY_TYPE_ERROR_OFFSET: as ERROR, then u64 offset
)

// IsError reports whether t is an error chunk type.
func (t ReplyType) IsError() bool { return t&replyTypeErrBit != 0 }

// Block status flags of the base:allocation context.
const (
	StateHole uint32 = 1 << 0 // NBD_STATE_HOLE
	StateZero uint32 = 1 << 1 // NBD_STATE_ZERO
)

// MetaContextBaseAllocation is the one metadata context the spec defines.
const MetaContextBaseAllocation = "base:allocation"

// Sizes fixed by the wire format.
const (
	RequestHeaderSize     = 28  // magic, flags, type, cookie, offset, length
	SimpleReplyHeaderSize = 16  // magic, error, cookie
	ChunkHeaderSize       = 20  // magic, flags, type, cookie, length
	optionHeaderSize      = 16  // IHAVEOPT, option, length
	optReplyHeaderSize    = 20  // magic, option, type, length
	zeroPadSize           = 124 // reserved zeroes after EXPORT_NAME and oldstyle
	oldstyleGreetingSize  = 8 + 8 + 8 + 4 + zeroPadSize
)

// Limits this implementation enforces on the wire.
const (
	// MaxStringLen bounds export names, queries and messages (spec: 4096).
	MaxStringLen = 4096
	// MaxOptionLen bounds one option's data before it is read into memory;
	// the largest legitimate option is a meta-context query list.
	MaxOptionLen = 64 << 10
	// MaxOptions bounds the options one handshake may send, so a client
	// cannot keep a connection in negotiation forever.
	MaxOptions = 1024
	// DefaultMaxPayload is the largest READ or WRITE the spec asks servers to
	// accept without negotiation (2^25).
	DefaultMaxPayload = 32 << 20
)
