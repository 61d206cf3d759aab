package control

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// fuzzHandler answers every command without doing anything, so that the
// whole conversation (request parsing, argument checks, reply wording)
// can be driven by arbitrary bytes.
type fuzzHandler struct{}

func (fuzzHandler) Status() StatusInfo                          { return StatusInfo{PID: 1, Size: 4096} }
func (fuzzHandler) SetACL([]string) error                       { return nil }
func (fuzzHandler) Mirror(context.Context, MirrorRequest) error { return ErrMirrorConnect }
func (fuzzHandler) Break(context.Context) error                 { return ErrNotMirroring }
func (fuzzHandler) SetMirrorSpeed(uint64) error                 { return ErrNotMirroring }
func (fuzzHandler) WaitMirror(context.Context) (string, error)  { return "", ErrNotMirroring }
func (fuzzHandler) SetUpstreams([]string) error                 { return ErrNotProxy }

// FuzzConversation feeds arbitrary bytes to the request parser and the
// command dispatcher. Whatever comes in, the parser either refuses it with
// one of its errors or returns non-empty lines without a newline (one
// trailing CR is taken for a CRLF ending; others stay), the lines survive
// being encoded again, and the answer is one well-formed reply line with
// one of the protocol's codes.
func FuzzConversation(f *testing.F) {
	for _, seed := range []string{
		"status\n\n", "status\n", "acl\n127.0.0.1\n::1\n\n", "mirror\n127.0.0.1\n10809\nexit\n\n",
		"mirror\n127.0.0.1\n10809\nunlink\n10.0.0.1\n100\n\n", "mirror_max_bps\n12\n\n", "break\n\n",
		"mirror_wait\n::1\n1\nnothing\n\n", "upstream\n10.0.0.1:10809\n/run/s\n\n", "\n", "",
		"bogus\n\n", "status\r\n\r\n", "mirror\n1.2.3.4\n99999\n\n", strings.Repeat("a", 5000) + "\n",
	} {
		f.Add([]byte(seed))
	}
	s := &Server{Handler: fuzzHandler{}}
	s.init()
	f.Fuzz(func(t *testing.T, in []byte) {
		lines, err := readRequest(bufio.NewReaderSize(bytes.NewReader(in), MaxLineBytes))
		if err != nil {
			require.True(t, errors.Is(err, errLineTooLong) || errors.Is(err, errRequestTooLong), "%v", err)
			return
		}
		for _, l := range lines {
			require.NotEmpty(t, l)
			require.NotContains(t, l, "\n")
		}
		if len(lines) > 0 && !strings.Contains(strings.Join(lines, ""), "\r") {
			enc, err := appendRequest(nil, lines[0], lines[1:])
			require.NoError(t, err)
			again, err := readRequest(bufio.NewReaderSize(bytes.NewReader(enc), MaxLineBytes))
			require.NoError(t, err)
			require.Equal(t, lines, again)
		}
		r := s.dispatch(lines)
		require.Contains(t, []int{CodeOK, CodeFailed, CodeMissingCommand, CodeUnknownCommand}, r.Code)
		wire := appendReply(nil, r)
		require.Equal(t, 1, bytes.Count(wire, []byte("\n")), "one line")
		back, err := parseReply(string(wire))
		require.NoError(t, err)
		require.Equal(t, r.Code, back.Code)
	})
}

// FuzzParseReply: any line parseReply accepts encodes back to a line it
// reads the same way.
func FuzzParseReply(f *testing.F) {
	for _, seed := range []string{"0: updated", "1: too many control connections", "10: unknown command",
		"garbage", "-1: x", "0:", "9:missing command", "0: pid=1 size=2 "} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, line string) {
		r, err := parseReply(line)
		if err != nil {
			return
		}
		require.GreaterOrEqual(t, r.Code, 0)
		back, err := parseReply(string(appendReply(nil, r)))
		require.NoError(t, err)
		require.Equal(t, r.Code, back.Code)
	})
}
