package proxy

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
	"github.com/flexnbd/flexnbd/internal/testserver"
)

// bin is the flexnbd command under test, built once by TestMain.
var bin string

// raceBuild is set by race_test.go in race-enabled test runs.
var raceBuild bool

func TestMain(m *testing.M) { testproc.Main(m, raceBuild, &bin) }

// backend is a `flexnbd serve` that a test may kill and start again on
// the same port and file.
type backend struct {
	proc *testproc.Proc
	file string
	port int
}

func newBackend(t *testing.T, size int64) *backend {
	t.Helper()
	file := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(file, nil, 0o644))
	require.NoError(t, os.Truncate(file, size))
	return &backend{file: file, port: testproc.FreePort(t)}
}

func (b *backend) addr() string { return fmt.Sprintf("127.0.0.1:%d", b.port) }

// start runs serve and returns once it accepts connections.
func (b *backend) start(t *testing.T) {
	t.Helper()
	b.proc = testproc.Start(t, "", bin, "serve", "--addr", "127.0.0.1", "--port", testproc.Itoa(b.port),
		"--file", b.file, "-v")
	b.proc.Stderr.WaitFor(t, "serving")
}

// kill ends serve with SIGKILL: no goodbye to its clients.
func (b *backend) kill(t *testing.T) {
	t.Helper()
	b.proc.Signal(t, 9)
	b.proc.Wait(t)
}

// startProxy runs `flexnbd proxy` on a free port in front of upstream and
// returns its address once it listens.
func startProxy(t *testing.T, upstream string, extra ...string) (*testproc.Proc, string) {
	t.Helper()
	host, port, err := net.SplitHostPort(upstream)
	require.NoError(t, err)
	lport := testproc.FreePort(t)
	args := append([]string{"proxy", "--addr", "127.0.0.1", "--port", testproc.Itoa(lport),
		"--conn-addr", host, "--conn-port", port, "-v"}, extra...)
	p := testproc.Start(t, "", bin, args...)
	p.Stderr.WaitFor(t, "proxying")
	return p, fmt.Sprintf("127.0.0.1:%d", lport)
}

func splitHostPort(t *testing.T, addr string) (string, string) {
	t.Helper()
	host, port, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	return host, port
}

// stamp runs four stamping writers (testserver.Stamper) through addr, each
// on blocks blocks of its own, until stop, which returns once they have.
func stamp(t *testing.T, addr string, blocks int) (*testserver.Stamper, func()) {
	s := &testserver.Stamper{Blocks: blocks}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.Run(ctx, t, addr, 4, 0)
	}()
	return s, func() {
		cancel()
		<-done
	}
}
