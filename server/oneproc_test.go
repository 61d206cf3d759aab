package server_test

import (
	"bufio"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/server"
)

// oneProcessorServerEnv, set, makes this test binary a server with one
// processor on a file in that directory instead of running tests (see
// TestMain).
const oneProcessorServerEnv = "FLEXNBD_TEST_ONE_PROCESSOR_SERVER"

// startOneProcessorServer re-executes this test binary as a server with
// GOMAXPROCS=1 and returns its address; it stops with the test.
func startOneProcessorServer(t *testing.T) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), oneProcessorServerEnv+"="+t.TempDir(), "GOMAXPROCS=1")
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	t.Cleanup(func() {
		stdin.Close() // the server exits when its stdin ends
		_ = cmd.Wait()
	})
	line, err := bufio.NewReader(stdout).ReadString('\n')
	require.NoError(t, err, "the one-processor server did not say where it listens")
	return line[:len(line)-1]
}

// serveOnOneProcessor is the child's side of startOneProcessorServer.
func serveOnOneProcessor(dir string) int {
	path := filepath.Join(dir, "export.img")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		return fail(err)
	}
	if err := os.Truncate(path, 64<<20); err != nil {
		return fail(err)
	}
	file, err := server.OpenFile(path, false)
	if err != nil {
		return fail(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail(err)
	}
	srv := server.New(server.Config{Backend: file})
	go func() {
		_, _ = io.Copy(io.Discard, os.Stdin)
		srv.Close()
	}()
	os.Stdout.WriteString(l.Addr().String() + "\n")
	if err := srv.Serve(l); err != nil && err != server.ErrServerClosed {
		return fail(err)
	}
	return 0
}

func fail(err error) int {
	os.Stderr.WriteString(err.Error() + "\n")
	return 1
}
