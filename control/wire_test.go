package control_test

import (
	"bufio"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/control"
)

func TestReadRequest(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		lines []string
		err   error
	}{
		{name: "command only", in: "status\n\n", lines: []string{"status"}},
		{name: "arguments", in: "acl\n10.0.0.1\n::1\n\n", lines: []string{"acl", "10.0.0.1", "::1"}},
		{name: "bytes after the empty line are not read", in: "status\n\nacl\n\n", lines: []string{"status"}},
		{name: "end of input ends the request", in: "acl\n10.0.0.1\n", lines: []string{"acl", "10.0.0.1"}},
		{name: "unterminated last line", in: "acl\n10.0.0.1", lines: []string{"acl", "10.0.0.1"}},
		{name: "carriage returns dropped", in: "acl\r\n10.0.0.1\r\n\r\n", lines: []string{"acl", "10.0.0.1"}},
		{name: "empty", in: "", lines: nil},
		{name: "empty line first", in: "\nstatus\n\n", lines: nil},
		{name: "longest line", in: strings.Repeat("a", control.MaxLineBytes-1) + "\n\n",
			lines: []string{strings.Repeat("a", control.MaxLineBytes-1)}},
		{name: "line too long", in: strings.Repeat("a", control.MaxLineBytes) + "\n\n", err: control.ErrLineTooLong},
		{name: "request too long", in: "acl\n" + strings.Repeat("10.0.0.1\n", control.MaxRequestBytes/9+1) + "\n",
			err: control.ErrRequestTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			lines, err := control.ReadRequest(bufio.NewReaderSize(strings.NewReader(tt.in), control.MaxLineBytes))
			if tt.err != nil {
				require.ErrorIs(t, err, tt.err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.lines, lines)
		})
	}
}

func TestAppendRequest(t *testing.T) {
	tests := []struct {
		name    string
		command string
		args    []string
		want    string
		errText string
	}{
		{name: "command only", command: "status", want: "status\n\n"},
		{name: "arguments", command: "acl", args: []string{"10.0.0.1", "::1"}, want: "acl\n10.0.0.1\n::1\n\n"},
		{name: "empty command", command: "", errText: "empty command"},
		{name: "empty argument would end the request", command: "acl", args: []string{"10.0.0.1", ""}, errText: "argument 2 is empty"},
		{name: "newline would split an argument", command: "acl", args: []string{"10.0.0.1\n::1"}, errText: "line break"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := control.AppendRequest(tt.command, tt.args...)
			if tt.errText != "" {
				require.ErrorContains(t, err, tt.errText)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.want, string(got))
		})
	}
}

func TestParseReply(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want control.Reply
		bad  bool
	}{
		{name: "success", in: "0: updated\n", want: control.Reply{Code: 0, Message: "updated"}},
		{name: "failure", in: "1: bad spec: x\n", want: control.Reply{Code: 1, Message: "bad spec: x"}},
		{name: "code 10", in: "10: unknown command\n", want: control.Reply{Code: 10, Message: "unknown command"}},
		{name: "colons in the message", in: "1: bad spec: ::1/200\n", want: control.Reply{Code: 1, Message: "bad spec: ::1/200"}},
		{name: "trailing space kept", in: "0: pid=1 \n", want: control.Reply{Code: 0, Message: "pid=1 "}},
		{name: "no space after the colon", in: "0:ok\n", want: control.Reply{Code: 0, Message: "ok"}},
		{name: "no newline", in: "0: ok", want: control.Reply{Code: 0, Message: "ok"}},
		{name: "no colon", in: "garbage\n", bad: true},
		{name: "code not a number", in: "x: y\n", bad: true},
		{name: "negative code", in: "-1: y\n", bad: true},
		{name: "empty", in: "", bad: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := control.ParseReply(tt.in)
			if tt.bad {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.want, got)
			if tt.in != "0:ok\n" && tt.in != "0: ok" {
				require.Equal(t, strings.TrimSuffix(tt.in, "\n"), got.String(), "String gives the wire form back")
			}
		})
	}
}
