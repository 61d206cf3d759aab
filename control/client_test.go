package control_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/control"
)

// rawServer accepts one conversation, reads the request and answers with
// exactly the bytes given, for replies our Server would never send.
func rawServer(t *testing.T, answer string) (path string, request <-chan string) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "raw.sock")
	l, err := net.Listen("unix", path)
	require.NoError(t, err)
	t.Cleanup(func() { l.Close() })
	got := make(chan string, 1)
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		r := bufio.NewReader(c)
		var req string
		for {
			line, err := r.ReadString('\n')
			req += line
			if err != nil || line == "\n" {
				break
			}
		}
		got <- req
		_, _ = io.WriteString(c, answer)
	}()
	return path, got
}

func TestClientReplies(t *testing.T) {
	tests := []struct {
		name    string
		answer  string
		want    control.Reply
		errText string
	}{
		{name: "success", answer: "0: updated\n", want: control.Reply{Code: 0, Message: "updated"}},
		{name: "failure is a reply, not an error", answer: "1: bad spec: x\n", want: control.Reply{Code: 1, Message: "bad spec: x"}},
		{name: "only the first line counts", answer: "0: one\n1: two\n", want: control.Reply{Code: 0, Message: "one"}},
		{name: "reply without newline", answer: "10: unknown command", want: control.Reply{Code: 10, Message: "unknown command"}},
		{name: "garbled", answer: "hello\n", errText: "malformed reply"},
		{name: "closed without a reply", answer: "", errText: "closed without a reply"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path, request := rawServer(t, tt.answer)
			r, err := (&control.Client{Path: path, Timeout: ioTimeout}).Do(context.Background(), "acl", "10.0.0.1", "::1")
			require.Equal(t, "acl\n10.0.0.1\n::1\n\n", <-request)
			if tt.errText != "" {
				require.ErrorContains(t, err, tt.errText)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.want, r)
		})
	}
}

func TestClientUnreachable(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
		reason  string
	}{
		{name: "no such file", reason: "no such file or directory"},
		{name: "nobody listening", prepare: staleSocket, reason: "connection refused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "ctl.sock")
			if tt.prepare != nil {
				tt.prepare(t, path)
			}
			_, err := (&control.Client{Path: path, Timeout: ioTimeout}).Do(context.Background(), control.CmdStatus)
			var ue *control.UnreachableError
			require.True(t, errors.As(err, &ue), "%v", err)
			require.Equal(t, "cannot reach control socket "+path+": "+tt.reason, err.Error())
		})
	}
}

func TestClientRefusesAmbiguousArguments(t *testing.T) {
	path, request := rawServer(t, "0: updated\n")
	_, err := (&control.Client{Path: path, Timeout: ioTimeout}).Do(context.Background(), control.CmdACL, "10.0.0.1", "")
	require.ErrorContains(t, err, "argument 2 is empty")
	select {
	case req := <-request:
		t.Fatalf("request %q was sent", req)
	default:
	}
}

func TestClientStatus(t *testing.T) {
	path := startServer(t, &control.Server{Handler: &fakeHandler{status: baseStatus}})
	r, fields, err := (&control.Client{Path: path, Timeout: ioTimeout}).Status(context.Background())
	require.NoError(t, err)
	require.True(t, r.OK())
	require.Equal(t, baseStatus.Fields(), fields)
}
