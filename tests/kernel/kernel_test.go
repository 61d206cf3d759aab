// Package kernel tests flexnbd with the Linux kernel's own NBD client:
// kernel-client-test.sh boots Debian's kernel under qemu, connects
// nbd-client to a flexnbd serve process on the host, and builds, fills,
// checks and re-reads an ext4 file system on the export.
package kernel

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
)

// guestTimeout bounds one boot of the guest; a run takes 10-20 s on two
// cores without KVM, and the script gives up by itself after 300 s.
const guestTimeout = 6 * time.Minute

// requireKernel fails the test, or skips it where missing tools are
// allowed, unless a Debian kernel can be booted: the script needs root to
// read /boot/vmlinuz-*.
func requireKernel(t *testing.T) {
	t.Helper()
	var problem string
	kernels, _ := filepath.Glob("/boot/vmlinuz-*")
	switch {
	case len(kernels) == 0:
		problem = "no kernel in /boot (apt-get install linux-image-amd64)"
	case os.Geteuid() != 0:
		problem = "must run as root to read " + kernels[0]
	}
	if problem == "" {
		if f, err := os.Open(kernels[0]); err != nil {
			problem = err.Error()
		} else {
			f.Close()
		}
	}
	if problem == "" {
		return
	}
	msg := "kernel NBD client test cannot run: " + problem
	if os.Getenv("FLEXNBD_ALLOW_MISSING_TOOLS") == "1" {
		t.Skip(msg)
	}
	t.Fatal(msg)
}

// TestKernelClient runs the kernel client harness against one flexnbd
// serve process, over one connection and over two (multi-connection),
// then stops the server with SIGTERM and expects a clean exit.
func TestKernelClient(t *testing.T) {
	requireKernel(t)
	// The script checks its other tools itself and exits 3 naming them.
	testserver.Tool(t, "qemu-system-x86_64")
	dir := t.TempDir()
	bin := filepath.Join(dir, "flexnbd")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/flexnbd/flexnbd/cmd/flexnbd").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	img := filepath.Join(dir, "scratch.img")
	require.NoError(t, os.WriteFile(img, nil, 0o644))
	require.NoError(t, os.Truncate(img, 256<<20))

	// The initramfs cache would otherwise land beside the script, in the
	// repository; FLEXNBD_KGUEST_CACHE keeps one across runs.
	cache := os.Getenv("FLEXNBD_KGUEST_CACHE")
	if cache == "" {
		cache = filepath.Join(dir, "kguest-cache")
	}
	script, err := filepath.Abs("kernel-client-test.sh")
	require.NoError(t, err)

	srv := startServer(t, bin, img)
	tests := []struct {
		name    string
		nbdOpts string
		conns   int
	}{
		{"one connection", "", 1},
		{"two connections", "-C 2", 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), guestTimeout)
			defer cancel()
			// The guest's verdict is on its serial console, which the
			// script prints only on failure; keep it to check the marker.
			console := filepath.Join(t.TempDir(), "console.log")
			cmd := exec.CommandContext(ctx, script, strconv.Itoa(srv.port))
			cmd.Env = append(os.Environ(),
				"KGUEST_BENCH_MB=0",
				"KGUEST_CACHE_DIR="+cache,
				"KGUEST_NBD_OPTS="+tc.nbdOpts,
				"KGUEST_LOG="+console,
			)
			logBefore := len(srv.log.String())
			start := time.Now()
			out, err := cmd.CombinedOutput()
			t.Logf("guest run took %v", time.Since(start).Round(time.Second))
			require.NoError(t, err, "kernel-client-test.sh failed:\n%s\nserver log:\n%s", out, srv.log.String())
			serial, err := os.ReadFile(console)
			require.NoError(t, err)
			require.Contains(t, string(serial), "KGUEST-RESULT: PASS", "%s", out)

			// The guest connects twice (write, then verify on another
			// device), each time with every connection -C asks for.
			runLog := srv.log.String()[logBefore:]
			assert.Equal(t, 2*tc.conns, strings.Count(runLog, `"message":"handshake complete"`), runLog)
			assert.NotContains(t, runLog, `"level":"warn"`)
			assert.NotContains(t, runLog, `"level":"error"`)
		})
	}

	require.NoError(t, srv.cmd.Process.Signal(syscall.SIGTERM))
	select {
	case <-srv.done:
	case <-time.After(time.Minute):
		t.Fatalf("flexnbd serve did not stop after SIGTERM\n%s", srv.log.String())
	}
	assert.Zero(t, srv.code, "exit status after SIGTERM\n%s", srv.log.String())
	assert.Contains(t, srv.log.String(), `"message":"stopped"`)
}

type serverProc struct {
	cmd  *exec.Cmd
	port int
	log  *syncBuffer
	done chan struct{}
	code int
}

// startServer runs flexnbd serve on a free port and returns once it logs
// that it is serving. Another process may take the port between the probe
// and the bind, so a bind failure is retried on a new port.
func startServer(t *testing.T, bin, img string) *serverProc {
	t.Helper()
	for attempt := 0; attempt < 5; attempt++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		require.NoError(t, err)
		port := l.Addr().(*net.TCPAddr).Port
		require.NoError(t, l.Close())

		p := &serverProc{port: port, log: &syncBuffer{}, done: make(chan struct{})}
		p.cmd = exec.Command(bin, "serve", "--addr", "127.0.0.1", "--port", strconv.Itoa(port),
			"--file", img, "-v", "--log-format", "json")
		p.cmd.Stderr = p.log
		require.NoError(t, p.cmd.Start())
		go func() {
			if err := p.cmd.Wait(); err != nil {
				p.code = -1
				if ee, ok := err.(*exec.ExitError); ok {
					p.code = ee.ExitCode()
				}
			}
			close(p.done)
		}()
		t.Cleanup(func() {
			select {
			case <-p.done:
			default:
				_ = p.cmd.Process.Kill()
				<-p.done
			}
		})
		select {
		case <-p.log.seen(`"message":"serving"`):
			return p
		case <-p.done:
			if !strings.Contains(p.log.String(), "address already in use") {
				t.Fatalf("flexnbd serve exited with %d:\n%s", p.code, p.log.String())
			}
		case <-time.After(time.Minute):
			t.Fatalf("flexnbd serve did not start:\n%s", p.log.String())
		}
	}
	t.Fatal("no free port after 5 attempts")
	return nil
}

// syncBuffer is the server's standard error, written by the process and
// read by the test.
type syncBuffer struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	waiters []waiter
}

type waiter struct {
	substr string
	ch     chan struct{}
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n, err := b.buf.Write(p)
	kept := b.waiters[:0]
	for _, w := range b.waiters {
		if strings.Contains(b.buf.String(), w.substr) {
			close(w.ch)
		} else {
			kept = append(kept, w)
		}
	}
	b.waiters = kept
	return n, err
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// seen returns a channel closed once substr has been written.
func (b *syncBuffer) seen(substr string) <-chan struct{} {
	b.mu.Lock()
	defer b.mu.Unlock()
	ch := make(chan struct{})
	if strings.Contains(b.buf.String(), substr) {
		close(ch)
	} else {
		b.waiters = append(b.waiters, waiter{substr, ch})
	}
	return ch
}
