package nbd

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestSpecConstants pins every protocol number to the value in the current
// NBD specification. Peers only interoperate if these agree bit for bit,
// and a wrong number (an older draft put the meta-context options at 10
// and 11) goes unnoticed when both ends of a test share it.
func TestSpecConstants(t *testing.T) {
	const errBit = 1 << 31
	const chunkErrBit = 1 << 15
	tests := []struct {
		name string
		got  uint64
		want uint64
	}{
		// Magics.
		{"NBDMAGIC", magicInitPasswd, 0x4e42444d41474943},
		{"IHAVEOPT", magicIHaveOpt, 0x49484156454F5054},
		{"cliserv_magic", magicOldstyle, 0x00420281861253},
		{"option reply magic", magicOptReply, 0x3e889045565a9},
		{"NBD_REQUEST_MAGIC", uint64(magicRequest), 0x25609513},
		{"NBD_SIMPLE_REPLY_MAGIC", uint64(magicSimpleReply), 0x67446698},
		{"NBD_STRUCTURED_REPLY_MAGIC", uint64(magicStructuredReply), 0x668e33ef},

		// Handshake flags.
		{"NBD_FLAG_FIXED_NEWSTYLE", uint64(FlagFixedNewstyle), 1 << 0},
		{"NBD_FLAG_NO_ZEROES", uint64(FlagNoZeroes), 1 << 1},
		{"NBD_FLAG_C_FIXED_NEWSTYLE", uint64(FlagCFixedNewstyle), 1 << 0},
		{"NBD_FLAG_C_NO_ZEROES", uint64(FlagCNoZeroes), 1 << 1},

		// Transmission flags.
		{"NBD_FLAG_HAS_FLAGS", uint64(FlagHasFlags), 1 << 0},
		{"NBD_FLAG_READ_ONLY", uint64(FlagReadOnly), 1 << 1},
		{"NBD_FLAG_SEND_FLUSH", uint64(FlagSendFlush), 1 << 2},
		{"NBD_FLAG_SEND_FUA", uint64(FlagSendFUA), 1 << 3},
		{"NBD_FLAG_ROTATIONAL", uint64(FlagRotational), 1 << 4},
		{"NBD_FLAG_SEND_TRIM", uint64(FlagSendTrim), 1 << 5},
		{"NBD_FLAG_SEND_WRITE_ZEROES", uint64(FlagSendWriteZeroes), 1 << 6},
		{"NBD_FLAG_SEND_DF", uint64(FlagSendDF), 1 << 7},
		{"NBD_FLAG_CAN_MULTI_CONN", uint64(FlagCanMultiConn), 1 << 8},
		{"NBD_FLAG_SEND_RESIZE", uint64(FlagSendResize), 1 << 9},
		{"NBD_FLAG_SEND_CACHE", uint64(FlagSendCache), 1 << 10},
		{"NBD_FLAG_SEND_FAST_ZERO", uint64(FlagSendFastZero), 1 << 11},

		// Options.
		{"NBD_OPT_EXPORT_NAME", uint64(OptExportName), 1},
		{"NBD_OPT_ABORT", uint64(OptAbort), 2},
		{"NBD_OPT_LIST", uint64(OptList), 3},
		{"NBD_OPT_PEEK_EXPORT", uint64(OptPeekExport), 4},
		{"NBD_OPT_STARTTLS", uint64(OptStartTLS), 5},
		{"NBD_OPT_INFO", uint64(OptInfo), 6},
		{"NBD_OPT_GO", uint64(OptGo), 7},
		{"NBD_OPT_STRUCTURED_REPLY", uint64(OptStructuredReply), 8},
		{"NBD_OPT_LIST_META_CONTEXT", uint64(OptListMetaContext), 9},
		{"NBD_OPT_SET_META_CONTEXT", uint64(OptSetMetaContext), 10},
		{"NBD_OPT_EXTENDED_HEADERS", uint64(OptExtendedHeaders), 11},

		// Option replies.
		{"NBD_REP_ACK", uint64(RepAck), 1},
		{"NBD_REP_SERVER", uint64(RepServer), 2},
		{"NBD_REP_INFO", uint64(RepInfo), 3},
		{"NBD_REP_META_CONTEXT", uint64(RepMetaContext), 4},
		{"NBD_REP_ERR_UNSUP", uint64(RepErrUnsup), errBit + 1},
		{"NBD_REP_ERR_POLICY", uint64(RepErrPolicy), errBit + 2},
		{"NBD_REP_ERR_INVALID", uint64(RepErrInvalid), errBit + 3},
		{"NBD_REP_ERR_PLATFORM", uint64(RepErrPlatform), errBit + 4},
		{"NBD_REP_ERR_TLS_REQD", uint64(RepErrTLSReqd), errBit + 5},
		{"NBD_REP_ERR_UNKNOWN", uint64(RepErrUnknown), errBit + 6},
		{"NBD_REP_ERR_SHUTDOWN", uint64(RepErrShutdown), errBit + 7},
		{"NBD_REP_ERR_BLOCK_SIZE_REQD", uint64(RepErrBlockSizeReqd), errBit + 8},
		{"NBD_REP_ERR_TOO_BIG", uint64(RepErrTooBig), errBit + 9},
		{"NBD_REP_ERR_EXT_HEADER_REQD", uint64(RepErrExtHeaderReqd), errBit + 10},

		// Info types.
		{"NBD_INFO_EXPORT", uint64(InfoExport), 0},
		{"NBD_INFO_NAME", uint64(InfoName), 1},
		{"NBD_INFO_DESCRIPTION", uint64(InfoDescription), 2},
		{"NBD_INFO_BLOCK_SIZE", uint64(InfoBlockSize), 3},

		// Commands.
		{"NBD_CMD_READ", uint64(CmdRead), 0},
		{"NBD_CMD_WRITE", uint64(CmdWrite), 1},
		{"NBD_CMD_DISC", uint64(CmdDisc), 2},
		{"NBD_CMD_FLUSH", uint64(CmdFlush), 3},
		{"NBD_CMD_TRIM", uint64(CmdTrim), 4},
		{"NBD_CMD_CACHE", uint64(CmdCache), 5},
		{"NBD_CMD_WRITE_ZEROES", uint64(CmdWriteZeroes), 6},
		{"NBD_CMD_BLOCK_STATUS", uint64(CmdBlockStatus), 7},
		{"NBD_CMD_RESIZE", uint64(CmdResize), 8},

		// Command flags.
		{"NBD_CMD_FLAG_FUA", uint64(CmdFlagFUA), 1 << 0},
		{"NBD_CMD_FLAG_NO_HOLE", uint64(CmdFlagNoHole), 1 << 1},
		{"NBD_CMD_FLAG_DF", uint64(CmdFlagDF), 1 << 2},
		{"NBD_CMD_FLAG_REQ_ONE", uint64(CmdFlagReqOne), 1 << 3},
		{"NBD_CMD_FLAG_FAST_ZERO", uint64(CmdFlagFastZero), 1 << 4},

		// Structured replies.
		{"NBD_REPLY_FLAG_DONE", uint64(ReplyFlagDone), 1 << 0},
		{"NBD_REPLY_TYPE_NONE", uint64(ReplyTypeNone), 0},
		{"NBD_REPLY_TYPE_OFFSET_DATA", uint64(ReplyTypeOffsetData), 1},
		{"NBD_REPLY_TYPE_OFFSET_HOLE", uint64(ReplyTypeOffsetHole), 2},
		{"NBD_REPLY_TYPE_BLOCK_STATUS", uint64(ReplyTypeBlockStatus), 5},
		{"NBD_REPLY_TYPE_ERROR", uint64(ReplyTypeError), chunkErrBit + 1},
		{"NBD_REPLY_TYPE_ERROR_OFFSET", uint64(ReplyTypeErrorOffset), chunkErrBit + 2},

		// base:allocation states.
		{"NBD_STATE_HOLE", uint64(StateHole), 1 << 0},
		{"NBD_STATE_ZERO", uint64(StateZero), 1 << 1},

		// Errors.
		{"NBD_EPERM", uint64(EPERM), 1},
		{"NBD_EIO", uint64(EIO), 5},
		{"NBD_ENOMEM", uint64(ENOMEM), 12},
		{"NBD_EINVAL", uint64(EINVAL), 22},
		{"NBD_ENOSPC", uint64(ENOSPC), 28},
		{"NBD_EOVERFLOW", uint64(EOVERFLOW), 75},
		{"NBD_ENOTSUP", uint64(ENOTSUP), 95},
		{"NBD_ESHUTDOWN", uint64(ESHUTDOWN), 108},

		// Sizes the wire format fixes.
		{"request header", RequestHeaderSize, 28},
		{"simple reply header", SimpleReplyHeaderSize, 16},
		{"chunk header", ChunkHeaderSize, 20},
		{"option header", optionHeaderSize, 16},
		{"option reply header", optReplyHeaderSize, 20},
		{"oldstyle greeting", oldstyleGreetingSize, 152},
		{"string limit", MaxStringLen, 4096},
		{"default max payload", DefaultMaxPayload, 1 << 25},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, tt.got, "%s = %#x, spec says %#x", tt.name, tt.got, tt.want)
		})
	}
}

func TestSpecStrings(t *testing.T) {
	require.Equal(t, "base:allocation", MetaContextBaseAllocation)
}

func TestErrorBits(t *testing.T) {
	tests := []struct {
		name    string
		isError bool
		want    bool
	}{
		{"REP_ACK", RepAck.IsError(), false},
		{"REP_META_CONTEXT", RepMetaContext.IsError(), false},
		{"REP_ERR_UNSUP", RepErrUnsup.IsError(), true},
		{"REP_ERR_EXT_HEADER_REQD", RepErrExtHeaderReqd.IsError(), true},
		{"unknown error reply", Rep(1<<31 | 200).IsError(), true},
		{"TYPE_NONE", ReplyTypeNone.IsError(), false},
		{"TYPE_BLOCK_STATUS", ReplyTypeBlockStatus.IsError(), false},
		{"TYPE_ERROR", ReplyTypeError.IsError(), true},
		{"TYPE_ERROR_OFFSET", ReplyTypeErrorOffset.IsError(), true},
		// The spec tells clients to treat unknown error chunks as errors.
		{"unknown error chunk", ReplyType(1<<15 | 77).IsError(), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, tt.isError)
		})
	}
}
