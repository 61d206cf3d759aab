package migration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/internal/testproc"
)

// bin is the flexnbd command under test, built once by TestMain.
var bin string

// raceBuild is set by race_test.go in race-enabled test runs.
var raceBuild bool

func TestMain(m *testing.M) { testproc.Main(m, raceBuild, &bin) }

// host is one side of a migration: a flexnbd process, its file and its
// control socket.
type host struct {
	proc *testproc.Proc
	file string
	sock string
	addr string // IP
	port int
}

func (h *host) target() string { return fmt.Sprintf("%s:%d", h.addr, h.port) }

// image creates a file of size bytes holding random data in the given
// share of it (from 0), the rest a hole.
func image(t testing.TB, size, data int64, seed uint64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, f.Truncate(size))
	r := rand.New(rand.NewPCG(seed, 1))
	buf := make([]byte, 1<<20)
	for off := int64(0); off < data; off += int64(len(buf)) {
		for i := range buf {
			buf[i] = byte(r.Uint32())
		}
		n := min(int64(len(buf)), data-off)
		_, err := f.WriteAt(buf[:n], off)
		require.NoError(t, err)
	}
	return path
}

// serve starts `flexnbd serve` on file with a control socket; ns is a
// network namespace or "" and ip the address to listen on.
func serve(t testing.TB, ns, ip, file string, extra ...string) *host {
	t.Helper()
	return start(t, "serve", ns, ip, file, extra...)
}

// listen starts `flexnbd listen` into file.
func listen(t testing.TB, ns, ip, file string, extra ...string) *host {
	t.Helper()
	return start(t, "listen", ns, ip, file, extra...)
}

func start(t testing.TB, mode, ns, ip, file string, extra ...string) *host {
	t.Helper()
	sock := filepath.Join(t.TempDir(), mode+".sock")
	h := &host{file: file, sock: sock, addr: ip, port: testproc.FreePort(t)}
	args := append([]string{mode, "--addr", ip, "--port", testproc.Itoa(h.port), "--file", file, "--sock", sock, "-v"}, extra...)
	h.proc = testproc.Start(t, ns, bin, args...)
	h.waitSock(t)
	return h
}

// restart starts the same mode again on the same port and file.
func (h *host) restart(t testing.TB, mode, ns string, extra ...string) {
	t.Helper()
	args := append([]string{mode, "--addr", h.addr, "--port", testproc.Itoa(h.port), "--file", h.file, "--sock", h.sock, "-v"}, extra...)
	h.proc = testproc.Start(t, ns, bin, args...)
	h.waitSock(t)
}

func (h *host) waitSock(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(testproc.Timeout)
	for {
		if _, err := os.Stat(h.sock); err == nil {
			return
		}
		select {
		case <-h.proc.Done():
			t.Fatalf("flexnbd exited before its control socket appeared:\n%s", h.proc.Stderr.Text())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("control socket never appeared:\n%s", h.proc.Stderr.Text())
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// status returns the status fields by name, or nil when the instance does
// not answer (it exited).
func (h *host) status(t testing.TB) map[string]string {
	t.Helper()
	c := control.Client{Path: h.sock, Timeout: 10 * time.Second}
	r, fields, err := c.Status(context.Background())
	if err != nil || !r.OK() {
		return nil
	}
	m := make(map[string]string, len(fields))
	for _, f := range fields {
		m[f.Key] = f.Value
	}
	return m
}

// ctl runs a flexnbd control mode against h and returns its output and
// exit status.
func (h *host) ctl(t testing.TB, args ...string) (string, string, int) {
	t.Helper()
	return testproc.Run(t, nil, bin, append(args, "--sock", h.sock)...)
}

// waitStatus polls h's status until cond holds.
func (h *host) waitStatus(t testing.TB, what string, cond func(map[string]string) bool) map[string]string {
	t.Helper()
	deadline := time.Now().Add(testproc.Timeout)
	for {
		st := h.status(t)
		if st != nil && cond(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s; last status %v\n%s", what, st, h.proc.Stderr.Text())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// sentAtLeast is a status condition: the migration has sent n bytes.
func sentAtLeast(n int64) func(map[string]string) bool {
	return func(st map[string]string) bool {
		return st["is_mirroring"] == "true" && num(st, "migration_bytes_sent") >= n
	}
}

// num is a numeric status field, 0 when absent.
func num(st map[string]string, key string) int64 {
	n, _ := strconv.ParseInt(st[key], 10, 64)
	return n
}

func requireSameFile(t testing.TB, a, b string) {
	t.Helper()
	pa, err := os.ReadFile(a)
	require.NoError(t, err)
	pb, err := os.ReadFile(b)
	require.NoError(t, err)
	require.Equal(t, len(pa), len(pb))
	for i := range pa {
		if pa[i] != pb[i] {
			t.Fatalf("%s and %s differ first at byte %d", a, b, i)
		}
	}
}

func controlClient(sock string) *control.Client {
	return &control.Client{Path: sock, Timeout: testproc.Timeout}
}

// exitCode waits for p and returns its exit status.
func exitCode(t testing.TB, p *testproc.Proc) int { return p.Wait(t) }

func logs(h *host) string { return strings.TrimSpace(h.proc.Stderr.Text()) }
