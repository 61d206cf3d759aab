package server_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/server"
)

// oneProcessorServerEnv, set, makes this test binary a server with one
// processor on a file in that directory instead of running tests (see
// TestMain).
const oneProcessorServerEnv = "FLEXNBD_TEST_ONE_PROCESSOR_SERVER"

// oneProcessorServer is a server in a child process with GOMAXPROCS=1.
type oneProcessorServer struct {
	Addr   string
	stdin  io.Closer
	stdout *bufio.Reader
	done   chan struct{}
}

// startOneProcessorServer re-executes this test binary as a server with
// GOMAXPROCS=1; it stops with the test at the latest.
func startOneProcessorServer(t *testing.T) *oneProcessorServer {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), oneProcessorServerEnv+"="+t.TempDir(), "GOMAXPROCS=1")
	stdin, err := cmd.StdinPipe()
	require.NoError(t, err)
	stdout, err := cmd.StdoutPipe()
	require.NoError(t, err)
	cmd.Stderr = os.Stderr
	require.NoError(t, cmd.Start())
	s := &oneProcessorServer{stdin: stdin, stdout: bufio.NewReader(stdout), done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		close(s.done)
	}()
	t.Cleanup(func() {
		stdin.Close() // the server exits when its stdin ends
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-s.done
			t.Error("the one-processor server did not stop when told; killed")
		}
	})
	line, err := s.stdout.ReadString('\n')
	require.NoError(t, err, "the one-processor server did not say where it listens")
	s.Addr = strings.TrimSpace(line)
	return s
}

// Stop ends the server and returns its count of turns given and of those
// taken (another reader ran during the turn; see Server.TurnsTaken).
func (s *oneProcessorServer) Stop(t *testing.T) (turns, taken uint64) {
	t.Helper()
	s.stdin.Close()
	line, err := s.stdout.ReadString('\n')
	require.NoError(t, err, "the one-processor server did not report its turns")
	_, err = fmt.Sscanf(line, "turns %d taken %d", &turns, &taken)
	require.NoError(t, err, "report: %q", line)
	return turns, taken
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
	fmt.Printf("turns %d taken %d\n", srv.Stats().Turns, srv.TurnsTaken())
	return 0
}

func fail(err error) int {
	os.Stderr.WriteString(err.Error() + "\n")
	return 1
}
