package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
	"github.com/flexnbd/flexnbd/nbd"
)

// flexnbdBin is the command under test, built once by TestMain.
var flexnbdBin string

// raceBuild is set by race_test.go in race-enabled test runs.
var raceBuild bool

func TestMain(m *testing.M) { testproc.Main(m, raceBuild, &flexnbdBin) }

type result struct {
	stdout, stderr []byte
	code           int
}

// runCLI runs flexnbd to completion with stdin as its standard input.
func runCLI(t *testing.T, stdin []byte, args ...string) result {
	t.Helper()
	stdout, stderr, code := testproc.Run(t, bytes.NewReader(stdin), flexnbdBin, args...)
	return result{[]byte(stdout), []byte(stderr), code}
}

// requireOneLine checks that a failure was reported as one line of text.
func requireOneLine(t *testing.T, stderr []byte) string {
	t.Helper()
	s := string(stderr)
	require.True(t, strings.HasSuffix(s, "\n") && strings.Count(s, "\n") == 1 && len(s) > 1,
		"want exactly one line on stderr, got %q", s)
	return strings.TrimSuffix(s, "\n")
}

// serveProc is a `flexnbd serve` process.
type serveProc struct {
	*testproc.Proc
	port int
}

// addr is the server's host:port.
func (p *serveProc) addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(p.port)) }

// stop sends sig and returns the exit status.
func (p *serveProc) stop(t *testing.T, sig syscall.Signal) int {
	t.Helper()
	p.Signal(t, sig)
	return p.Wait(t)
}

// startServe runs `flexnbd serve` on file and a free port and returns once
// it accepts connections. Unless quiet, the server logs JSON at info level
// and readiness is its "serving" line; a quiet server prints nothing, so
// it is probed with connections instead.
func startServe(t *testing.T, file string, quiet bool, extra ...string) *serveProc {
	t.Helper()
	for attempt := 0; attempt < 5; attempt++ {
		p := &serveProc{port: testproc.FreePort(t)}
		args := []string{"serve", "--addr", "127.0.0.1", "--port", strconv.Itoa(p.port), "--file", file}
		if quiet {
			args = append(args, "-q")
		} else {
			args = append(args, "-v", "--log-format", "json")
		}
		p.Proc = testproc.Start(t, "", flexnbdBin, append(args, extra...)...)
		if p.ready(quiet) {
			return p
		}
		code := p.Wait(t)
		if !strings.Contains(p.Stderr.Text(), "address already in use") {
			t.Fatalf("flexnbd serve exited with %d before serving:\n%s", code, p.Stderr.Text())
		}
	}
	t.Fatal("no free port after 5 attempts")
	return nil
}

func (p *serveProc) ready(quiet bool) bool {
	if !quiet {
		_, ok := p.Stderr.Line(`"message":"serving"`, p.Done(), testproc.Timeout)
		return ok
	}
	for i := 0; i < 500; i++ {
		select {
		case <-p.Done():
			return false
		default:
		}
		if c, err := net.DialTimeout("tcp", p.addr(), time.Second); err == nil {
			c.Close()
			return true
		}
		time.Sleep(10 * time.Millisecond) // nothing to wait on in another process
	}
	return false
}

// scratch creates a file of size bytes, zero or filled with init.
func scratch(t *testing.T, size int64, init []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "export.img")
	require.NoError(t, os.WriteFile(path, init, 0o644))
	require.NoError(t, os.Truncate(path, size))
	return path
}

func randomData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func rw(mode string, p *serveProc, from, size int, extra ...string) []string {
	return append([]string{mode, "--addr", "127.0.0.1", "--port", strconv.Itoa(p.port),
		"--from", strconv.Itoa(from), "--size", strconv.Itoa(size)}, extra...)
}

// TestReadWrite round-trips data through `flexnbd write` and `flexnbd read`
// against a running `flexnbd serve`, including transfers split into
// several requests and one from a bound source address.
func TestReadWrite(t *testing.T) {
	const exportSize = 24 << 20
	path := scratch(t, exportSize, nil)
	p := startServe(t, path, false)
	tests := []struct {
		name      string
		off, size int
		extra     []string
	}{
		{"unaligned few MiB", 1<<20 + 333, 3<<20 + 17, nil},
		{"split over 4 MiB", 4096, 9<<20 + 5, nil},
		{"one byte at the end", exportSize - 1, 1, nil},
		{"bound source address", 20 << 20, 64 << 10, []string{"--bind", "127.0.0.1"}},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			data := randomData(tc.size, uint64(i+1))
			w := runCLI(t, data, rw("write", p, tc.off, tc.size, tc.extra...)...)
			require.Zero(t, w.code, "write: %s", w.stderr)
			assert.Empty(t, w.stdout)
			assert.Empty(t, w.stderr)

			r := runCLI(t, nil, rw("read", p, tc.off, tc.size, tc.extra...)...)
			require.Zero(t, r.code, "read: %s", r.stderr)
			assert.Empty(t, r.stderr)
			require.True(t, bytes.Equal(data, r.stdout), "read returned what was written")

			f, err := os.ReadFile(path)
			require.NoError(t, err)
			require.True(t, bytes.Equal(data, f[tc.off:tc.off+tc.size]), "the file holds what was written")
		})
	}
	assert.Zero(t, p.stop(t, syscall.SIGTERM))
}

// TestReadWriteErrors checks that every failure of read and write exits
// non-zero with one line of explanation and nothing on standard output.
func TestReadWriteErrors(t *testing.T) {
	const exportSize = 8 << 20
	path := scratch(t, exportSize, nil)
	p := startServe(t, path, false)
	closed := &serveProc{port: testproc.FreePort(t)} // nobody listens there

	tests := []struct {
		name  string
		stdin []byte
		args  []string
		want  string // part of the message
	}{
		{"write with short stdin", make([]byte, 5<<20+100), rw("write", p, 0, 6<<20), "1048476 bytes short"},
		{"write with empty stdin", nil, rw("write", p, 0, 512), "512 bytes short"},
		{"write beyond export", make([]byte, 4096), rw("write", p, exportSize-1024, 4096), "beyond the export size"},
		{"read beyond export", nil, rw("read", p, exportSize, 1), "beyond the export size"},
		{"range overflows", nil, append(rw("read", p, 0, 1)[:5], "--from", "18446744073709551615", "--size", "2"), "beyond"},
		{"too large", nil, rw("read", p, 0, 1<<30+1), "over the 1 GiB limit"},
		{"unreachable server", nil, rw("read", closed, 0, 512), "connection refused"},
		{"bad bind address", nil, rw("read", p, 0, 512, "--bind", "not-an-ip"), "bad bind address"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := runCLI(t, tc.stdin, tc.args...)
			assert.Equal(t, 1, res.code)
			assert.Empty(t, res.stdout)
			assert.Contains(t, requireOneLine(t, res.stderr), tc.want)
		})
	}
	assert.Zero(t, p.stop(t, syscall.SIGTERM))
}

// TestUsageErrors checks that a bad command line exits 1 with exactly one
// line on stderr, before anything is served.
func TestUsageErrors(t *testing.T) {
	file := scratch(t, 1<<20, nil)
	port := strconv.Itoa(testproc.FreePort(t))
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no mode", nil, "expected one of"},
		{"unknown mode", []string{"bogus"}, "bogus"},
		{"unknown flag", []string{"serve", "-l", "127.0.0.1", "-p", port, "-f", file, "--bogus"}, "--bogus"},
		{"missing file flag", []string{"serve", "-l", "127.0.0.1", "-p", port}, "--file"},
		{"missing port", []string{"serve", "-l", "127.0.0.1", "-f", file}, "--port"},
		{"non-numeric port", []string{"serve", "-l", "127.0.0.1", "-p", "abc", "-f", file}, "abc"},
		{"port out of range", []string{"serve", "-l", "127.0.0.1", "-p", "70000", "-f", file}, "70000"},
		{"bad ACL entry", []string{"serve", "-l", "127.0.0.1", "-p", port, "-f", file, "10.0.0.0/33"}, "bad spec: 10.0.0.0/33"},
		{"bad IPv6 ACL entry", []string{"serve", "-l", "127.0.0.1", "-p", port, "-f", file, "::1/129"}, "bad spec: ::1/129"},
		{"bad log format", []string{"serve", "-l", "127.0.0.1", "-p", port, "-f", file, "--log-format", "xml"}, "xml"},
		{"missing file", []string{"serve", "-l", "127.0.0.1", "-p", port, "-f", file + ".missing"}, "no such file"},
		{"read without size", []string{"read", "-l", "127.0.0.1", "-p", port, "-F", "0"}, "--size"},
		{"non-numeric offset", []string{"write", "-l", "127.0.0.1", "-p", port, "-F", "x", "-S", "1"}, "--from"},
		{"max memory too small", []string{"serve", "-l", "127.0.0.1", "-p", port, "-f", file, "--max-memory", "4096"}, "--max-memory"},
		{"max clients zero", []string{"serve", "-l", "127.0.0.1", "-p", port, "-f", file, "--max-clients", "0"}, "--max-clients"},
		{"proxy without upstream", []string{"proxy", "-l", "127.0.0.1", "-p", port}, "--conn-addr"},
		{"proxy without upstream port", []string{"proxy", "-l", "127.0.0.1", "-p", port, "-C", "127.0.0.1"}, "--conn-port"},
		{"proxy with a port on a socket", []string{"proxy", "-l", "/tmp/x.sock", "-p", port, "-C", "127.0.0.1", "-P", "1"}, "--port"},
		{"proxy bad bind", []string{"proxy", "-l", "127.0.0.1", "-p", port, "-C", "127.0.0.1", "-P", "1", "-b", "nope"}, "--bind"},
		{"proxy negative procs", []string{"proxy", "-l", "127.0.0.1", "-p", port, "-C", "127.0.0.1", "-P", "1", "--procs=-1"}, "--procs"},
		{"proxy bad outage", []string{"proxy", "-l", "127.0.0.1", "-p", port, "-C", "127.0.0.1", "-P", "1", "--max-outage", "soon"}, "--max-outage"},
		{"upstream without addresses", []string{"upstream", "-s", "/nonexistent.sock"}, "upstream"},
		{"proxy bad cache", []string{"proxy", "-l", "127.0.0.1", "-p", port, "-C", "127.0.0.1", "-P", "1", "--cache=lots"}, "--cache"},
		{"proxy cache too big", []string{"proxy", "-l", "127.0.0.1", "-p", port, "-C", "127.0.0.1", "-P", "1", "--cache=67108864"}, "32 MiB"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := runCLI(t, nil, tc.args...)
			assert.Equal(t, 1, res.code)
			assert.Empty(t, res.stdout)
			assert.Contains(t, requireOneLine(t, res.stderr), tc.want)
		})
	}
}

// TestHelp checks that help is printed on standard output with status 0.
func TestHelp(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"help", []string{"help"}, []string{"Usage: flexnbd", "serve", "read", "write"}},
		{"help serve", []string{"help", "serve"}, []string{"flexnbd serve", "--addr", "--port", "--file", "--default-deny", "--killswitch", "--read-only", "--oldstyle"}},
		{"help read", []string{"help", "read"}, []string{"flexnbd read", "--from", "--size", "--bind"}},
		{"help write", []string{"help", "write"}, []string{"flexnbd write", "--from", "--size"}},
		{"--help", []string{"--help"}, []string{"Usage: flexnbd"}},
		{"serve --help", []string{"serve", "--help"}, []string{"flexnbd serve", "--file"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			res := runCLI(t, nil, tc.args...)
			assert.Zero(t, res.code, "%s", res.stderr)
			assert.Empty(t, res.stderr)
			for _, w := range tc.want {
				assert.Contains(t, string(res.stdout), w)
			}
		})
	}
	t.Run("help of an unknown mode", func(t *testing.T) {
		res := runCLI(t, nil, "help", "bogus")
		assert.Equal(t, 1, res.code)
		requireOneLine(t, res.stderr)
	})
}

// TestServeSignals stops a server that has writes in flight with each of
// the signals C flexnbd handles. The server must exit 0 and every write
// it acknowledged must be in the file.
func TestServeSignals(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT} {
		t.Run(sig.String(), func(t *testing.T) {
			const piece, pieces = 256 << 10, 64
			path := scratch(t, pieces*piece, nil)
			p := startServe(t, path, false)
			ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
			defer cancel()
			c, err := nbd.Dial(ctx, "tcp", p.addr(), nil)
			require.NoError(t, err)
			defer c.Close()
			data := randomData(pieces*piece, uint64(sig))

			acked := make([]bool, pieces)
			first := make(chan struct{})
			var once sync.Once
			var wg sync.WaitGroup
			for i := 0; i < pieces; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					if c.Write(ctx, data[i*piece:(i+1)*piece], uint64(i*piece), 0) == nil {
						acked[i] = true
						once.Do(func() { close(first) })
					}
				}()
			}
			select {
			case <-first:
			case <-ctx.Done():
				t.Fatal("no write was acknowledged")
			}
			require.Zero(t, p.stop(t, sig), p.Stderr.Text())
			wg.Wait()

			f, err := os.ReadFile(path)
			require.NoError(t, err)
			n := 0
			for i, ok := range acked {
				if ok {
					n++
					assert.True(t, bytes.Equal(data[i*piece:(i+1)*piece], f[i*piece:(i+1)*piece]), "acknowledged write %d is in the file", i)
				}
			}
			t.Logf("%d of %d writes acknowledged before the connection closed", n, pieces)
			_, ok := p.Stderr.Line(`"message":"stopped"`, p.Done(), time.Second)
			assert.True(t, ok, "the server logged a clean stop:\n%s", p.Stderr.Text())
		})
	}
}

// TestServeReadOnly checks that --read-only refuses writes and still
// serves reads.
func TestServeReadOnly(t *testing.T) {
	orig := randomData(1<<20, 7)
	path := scratch(t, 2<<20, orig)
	p := startServe(t, path, false, "--read-only")

	w := runCLI(t, make([]byte, 4096), rw("write", p, 0, 4096)...)
	assert.Equal(t, 1, w.code)
	assert.Contains(t, requireOneLine(t, w.stderr), "EPERM")

	r := runCLI(t, nil, rw("read", p, 1000, 5000)...)
	require.Zero(t, r.code, "%s", r.stderr)
	assert.Equal(t, orig[1000:6000], r.stdout)
	assert.Zero(t, p.stop(t, syscall.SIGTERM))

	f, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(orig, f[:len(orig)]), "the file is unchanged")
}

// TestServeOldstyle checks that --oldstyle greets as C flexnbd does and
// that read and write work against it.
func TestServeOldstyle(t *testing.T) {
	path := scratch(t, 4<<20+700, nil)
	p := startServe(t, path, false, "--oldstyle")

	conn, err := net.DialTimeout("tcp", p.addr(), 5*time.Second)
	require.NoError(t, err)
	require.NoError(t, conn.SetDeadline(time.Now().Add(10*time.Second)))
	g := make([]byte, 152)
	_, err = io.ReadFull(conn, g)
	conn.Close()
	require.NoError(t, err)
	assert.Equal(t, "NBDMAGIC", string(g[:8]))
	assert.Equal(t, uint64(0x00420281861253), binary.BigEndian.Uint64(g[8:16]))
	assert.Equal(t, uint64(4<<20+512), binary.BigEndian.Uint64(g[16:24]))
	assert.Equal(t, make([]byte, 124), g[28:])

	data := randomData(100000, 3)
	w := runCLI(t, data, rw("write", p, 777, len(data))...)
	require.Zero(t, w.code, "%s", w.stderr)
	r := runCLI(t, nil, rw("read", p, 777, len(data))...)
	require.Zero(t, r.code, "%s", r.stderr)
	assert.True(t, bytes.Equal(data, r.stdout))
	assert.Zero(t, p.stop(t, syscall.SIGTERM))
}

// TestServeLogging checks the two logging extremes scripts rely on: -q
// prints nothing in a normal run, and -v --log-format json prints only
// JSON objects, one per line.
func TestServeLogging(t *testing.T) {
	t.Run("quiet", func(t *testing.T) {
		path := scratch(t, 1<<20, nil)
		p := startServe(t, path, true)
		w := runCLI(t, make([]byte, 8192), rw("write", p, 0, 8192)...)
		require.Zero(t, w.code, "%s", w.stderr)
		r := runCLI(t, nil, rw("read", p, 0, 8192)...)
		require.Zero(t, r.code, "%s", r.stderr)
		require.Zero(t, p.stop(t, syscall.SIGTERM))
		assert.Empty(t, p.Stderr.Text())
	})

	t.Run("verbose json", func(t *testing.T) {
		path := scratch(t, 1<<20, nil)
		p := startServe(t, path, false)
		w := runCLI(t, make([]byte, 8192), rw("write", p, 0, 8192)...)
		require.Zero(t, w.code, "%s", w.stderr)
		require.Zero(t, p.stop(t, syscall.SIGTERM))
		text := p.Stderr.Text()
		require.True(t, strings.HasSuffix(text, "\n"), "the log ends with a whole line")
		var messages []string
		for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
			var obj map[string]any
			require.NoError(t, json.Unmarshal([]byte(line), &obj), "line %q", line)
			assert.Contains(t, obj, "level")
			assert.Contains(t, obj, "time")
			msg, _ := obj["message"].(string)
			messages = append(messages, msg)
		}
		for _, want := range []string{"serving", "handshake complete", "client disconnected", "shutting down", "stopped"} {
			assert.Contains(t, messages, want)
		}
	})
}

// Installed as a link named flexnbd-proxy, the binary is the proxy mode,
// with the C flexnbd-proxy's flags.
func TestRunAsFlexnbdProxy(t *testing.T) {
	link := filepath.Join(t.TempDir(), "flexnbd-proxy")
	require.NoError(t, os.Symlink(flexnbdBin, link))
	stdout, stderr, code := testproc.Run(t, nil, link, "--help")
	require.Zero(t, code, stderr)
	assert.Contains(t, stdout, "--conn-addr")
	assert.Contains(t, stdout, "--conn-port")
	_, stderr, code = testproc.Run(t, nil, link, "-l", "127.0.0.1", "-p", "1")
	assert.Equal(t, 1, code)
	assert.Equal(t, "flexnbd-proxy: missing flags: --conn-addr=STRING\n", stderr, "named as it was called")
	_, stderr, code = testproc.Run(t, nil, link, "-l", "127.0.0.1", "-p", "1", "-C", "127.0.0.1", "-P", "1", "--cache=1,5M")
	assert.Equal(t, 1, code)
	assert.True(t, strings.HasPrefix(stderr, "flexnbd-proxy: --cache: "), stderr)
}

// The proxy runs on one processor per CPU unless --procs says otherwise.
func TestProxyProcs(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want int
	}{
		{nil, runtime.NumCPU()},
		{[]string{"--procs", "1"}, 1},
		{[]string{"--procs=0"}, runtime.NumCPU()},
	} {
		port := testproc.FreePort(t)
		args := append([]string{"proxy", "-l", "127.0.0.1", "-p", strconv.Itoa(port),
			"-C", "127.0.0.1", "-P", strconv.Itoa(testproc.FreePort(t)), "-v"}, tc.args...)
		p := testproc.Start(t, "", flexnbdBin, args...)
		p.Stderr.WaitFor(t, "proxying")
		assert.Contains(t, p.Stderr.Text(), fmt.Sprintf("procs=%d ", tc.want), tc.args)
		p.Signal(t, syscall.SIGTERM)
		assert.Zero(t, p.Wait(t))
	}
}

// With fewer descriptors than --max-clients needs, serve lowers the limit
// and says so, keeping a reserve for its control socket and files.
func TestMaxClientsFitsTheDescriptorLimit(t *testing.T) {
	file := scratch(t, 1<<20, nil)
	port := testproc.FreePort(t)
	p := testproc.Start(t, "", "sh", "-c", "ulimit -n 200 && exec \"$0\" \"$@\"", flexnbdBin,
		"serve", "--addr", "127.0.0.1", "--port", strconv.Itoa(port), "--file", file, "-v")
	p.Stderr.WaitFor(t, "serving")
	assert.Contains(t, p.Stderr.Text(), "descriptor limit below max-clients; lowering it")
	assert.Contains(t, p.Stderr.Text(), "now=136")
	p.Signal(t, syscall.SIGTERM)
	assert.Zero(t, p.Wait(t))
}
