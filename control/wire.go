package control

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
)

// Reply codes. The C flexnbd uses 0 and 1 for the outcome of a command and
// 9 and 10 for requests it could not dispatch; its tools exit with the code.
const (
	CodeOK             = 0
	CodeFailed         = 1
	CodeMissingCommand = 9
	CodeUnknownCommand = 10
)

// Command names as they appear on the first line of a request.
const (
	CmdStatus       = "status"
	CmdACL          = "acl"
	CmdMirror       = "mirror"
	CmdMirrorMaxBps = "mirror_max_bps"
	CmdBreak        = "break"
	// CmdMirrorWait takes the lines of CmdMirror and answers only once
	// the migration it started has ended (this implementation's own).
	CmdMirrorWait = "mirror_wait"
	// CmdUpstream replaces a proxy's upstream list: one host:port (or
	// Unix socket path) per line, tried in that order.
	CmdUpstream = "upstream"
)

const (
	// MaxLineBytes bounds one request line, its '\n' included. The
	// longest legitimate line is an IPv6 prefix; the C flexnbd stops at
	// 256 bytes, this is roomier.
	MaxLineBytes = 4096
	// MaxRequestBytes bounds a whole request: enough for an access list
	// of thousands of entries.
	MaxRequestBytes = 256 << 10
	// maxReplyBytes bounds the one line a client accepts back.
	maxReplyBytes = 64 << 10
)

// Request reading errors; the server answers them with CodeFailed.
var (
	errLineTooLong    = errors.New("request line too long")
	errRequestTooLong = errors.New("request too long")
)

// Reply is the server's one-line answer.
type Reply struct {
	Code    int
	Message string
}

// OK reports whether the command succeeded.
func (r Reply) OK() bool { return r.Code == CodeOK }

// String returns the reply as it travels, without the newline.
func (r Reply) String() string { return strconv.Itoa(r.Code) + ": " + r.Message }

// appendReply encodes r as one line. Newlines in the message would let it
// pass for several replies, so they become spaces.
func appendReply(dst []byte, r Reply) []byte {
	dst = strconv.AppendInt(dst, int64(r.Code), 10)
	dst = append(dst, ": "...)
	for i := 0; i < len(r.Message); i++ {
		b := r.Message[i]
		if b == '\n' || b == '\r' {
			b = ' '
		}
		dst = append(dst, b)
	}
	return append(dst, '\n')
}

// readRequest reads lines up to the empty line that ends a request, or up
// to the end of input. A final line without '\n' still counts, and a
// trailing '\r' is dropped, so that hand-typed requests work.
func readRequest(r *bufio.Reader) ([]string, error) {
	var lines []string
	total := 0
	for {
		raw, err := r.ReadSlice('\n')
		total += len(raw)
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			return nil, errLineTooLong
		case total > MaxRequestBytes:
			return nil, errRequestTooLong
		case err == io.EOF:
			if line := trimLine(raw); line != "" {
				lines = append(lines, line)
			}
			return lines, nil
		case err != nil:
			return nil, err
		}
		line := trimLine(raw)
		if line == "" {
			return lines, nil
		}
		lines = append(lines, line)
	}
}

func trimLine(b []byte) string {
	s := string(b)
	s = strings.TrimSuffix(s, "\n")
	return strings.TrimSuffix(s, "\r")
}

// appendRequest encodes a command and its arguments. An argument that is
// empty or holds a line break would change the request's meaning, so it
// is refused rather than sent.
func appendRequest(dst []byte, command string, args []string) ([]byte, error) {
	for i, s := range append([]string{command}, args...) {
		if s == "" {
			if i == 0 {
				return nil, errors.New("control: empty command")
			}
			return nil, fmt.Errorf("control: argument %d is empty", i)
		}
		if strings.ContainsAny(s, "\r\n") {
			return nil, fmt.Errorf("control: %q holds a line break", s)
		}
		dst = append(dst, s...)
		dst = append(dst, '\n')
	}
	return append(dst, '\n'), nil
}

// parseReply decodes "CODE: message". The C flexnbd writes the space after
// the colon; a reply without it is accepted too.
func parseReply(line string) (Reply, error) {
	line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
	codeText, msg, ok := strings.Cut(line, ":")
	if !ok {
		return Reply{}, fmt.Errorf("control: malformed reply %q", line)
	}
	code, err := strconv.Atoi(codeText)
	if err != nil || code < 0 {
		return Reply{}, fmt.Errorf("control: malformed reply %q", line)
	}
	return Reply{Code: code, Message: strings.TrimPrefix(msg, " ")}, nil
}
