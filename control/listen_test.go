package control_test

import (
	"context"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/control"
)

// staleSocket leaves a socket file at path that nobody listens on, as a
// process that was killed does.
func staleSocket(t *testing.T, path string) {
	t.Helper()
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	require.NoError(t, err)
	l.SetUnlinkOnClose(false)
	require.NoError(t, l.Close())
	fi, err := os.Lstat(path)
	require.NoError(t, err)
	require.Equal(t, fs.ModeSocket, fi.Mode().Type())
}

func askStatus(t *testing.T, path string) control.Reply {
	t.Helper()
	r, err := (&control.Client{Path: path, Timeout: ioTimeout}).Do(context.Background(), control.CmdStatus)
	require.NoError(t, err)
	return r
}

func TestListen(t *testing.T) {
	tests := []struct {
		name    string
		prepare func(t *testing.T, path string)
		errText string
	}{
		{name: "fresh path"},
		{name: "stale socket is replaced", prepare: staleSocket},
		{name: "regular file is left alone", errText: "exists and is not a socket",
			prepare: func(t *testing.T, path string) { require.NoError(t, os.WriteFile(path, []byte("keep"), 0o644)) }},
		{name: "directory is left alone", errText: "exists and is not a socket",
			prepare: func(t *testing.T, path string) { require.NoError(t, os.Mkdir(path, 0o755)) }},
		{name: "missing directory", errText: "no such file or directory",
			prepare: func(t *testing.T, path string) { require.NoError(t, os.Remove(filepath.Dir(path))) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "ctl.sock")
			if tt.prepare != nil {
				tt.prepare(t, path)
			}
			before, _ := os.Lstat(path)
			l, err := control.Listen(path)
			if tt.errText != "" {
				require.ErrorContains(t, err, tt.errText)
				after, _ := os.Lstat(path)
				if before != nil {
					require.True(t, os.SameFile(before, after), "the existing file must not be touched")
				}
				return
			}
			require.NoError(t, err)
			fi, err := os.Lstat(path)
			require.NoError(t, err)
			require.Equal(t, fs.ModeSocket, fi.Mode().Type())
			require.Equal(t, fs.FileMode(0o600), fi.Mode().Perm())
			require.Equal(t, path, l.Addr().String())

			srv := &control.Server{Handler: &fakeHandler{status: baseStatus}}
			served := make(chan error, 1)
			go func() { served <- srv.Serve(l) }()
			require.Equal(t, control.CodeOK, askStatus(t, path).Code)

			require.NoError(t, srv.Close())
			require.ErrorIs(t, <-served, control.ErrServerClosed)
			_, err = os.Lstat(path)
			require.ErrorIs(t, err, fs.ErrNotExist, "closing removes the socket file")
			entries, err := os.ReadDir(dir)
			require.NoError(t, err)
			require.Empty(t, entries, "nothing is left behind in the directory")
		})
	}
}

// TestListenLiveSocket: a second instance on the same path fails and the
// first one keeps its socket.
func TestListenLiveSocket(t *testing.T) {
	path := startServer(t, &control.Server{Handler: &fakeHandler{status: baseStatus}})
	_, err := control.Listen(path)
	require.ErrorIs(t, err, control.ErrSocketInUse)
	require.ErrorContains(t, err, path)
	require.Equal(t, control.CodeOK, askStatus(t, path).Code, "the live instance still answers")
}

// TestListenCloseSparesReplacement: if the path was taken over meanwhile,
// Close must not delete the newcomer's file.
func TestListenCloseSparesReplacement(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	l, err := control.Listen(path)
	require.NoError(t, err)
	require.NoError(t, os.Remove(path))
	require.NoError(t, os.WriteFile(path, []byte("new owner"), 0o600))
	require.NoError(t, l.Close())
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	require.Equal(t, "new owner", string(data))
}
