package main

import (
	"bytes"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
	"github.com/flexnbd/flexnbd/internal/testserver"
)

// nbdinfoExport is the part of `nbdinfo --json` the tests look at.
type nbdinfoExport struct {
	Name        string `json:"export-name"`
	Description string `json:"description"`
	Size        uint64 `json:"export-size"`
}

func nbdinfo(t *testing.T, args ...string) []nbdinfoExport {
	t.Helper()
	bin := testserver.Tool(t, "nbdinfo")
	out, stderr, code := testproc.Run(t, nil, bin, append([]string{"--json"}, args...)...)
	require.Zero(t, code, "nbdinfo %v: %s", args, stderr)
	var info struct {
		Exports []nbdinfoExport `json:"exports"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &info), out)
	return info.Exports
}

// printedURI waits for the URI --print-uri writes on standard output.
func printedURI(t *testing.T, p *testproc.Proc) string {
	t.Helper()
	line, ok := p.Stdout.Line("nbd", p.Done(), testproc.Timeout)
	require.True(t, ok, "no URI printed; stderr:\n%s", p.Stderr.Text())
	return line
}

// serve --port 0 --print-uri prints the one URI clients need, with the
// port the kernel chose; nbdinfo finds the export's name and description
// there, and the read and write modes take the same URI.
func TestPrintURIAndExportName(t *testing.T) {
	data := randomData(1<<20, 7)
	file := scratch(t, 1<<20, data)
	p := testproc.Start(t, "", flexnbdBin, "serve", "-l", "127.0.0.1", "-p", "0", "-f", file, "--print-uri",
		"--export-name", "vm 1", "--description", "the first disk")
	uri := printedURI(t, p)
	assert.Regexp(t, `^nbd://127\.0\.0\.1:[1-9][0-9]*/vm%201$`, uri)
	assert.Equal(t, 1, strings.Count(p.Stdout.Text(), "\n"), "exactly one line on stdout")

	exports := nbdinfo(t, uri)
	require.Len(t, exports, 1)
	assert.Equal(t, nbdinfoExport{Name: "vm 1", Description: "the first disk", Size: 1 << 20}, exports[0])

	host := strings.TrimSuffix(strings.TrimPrefix(uri, "nbd://"), "/vm%201")
	listed := nbdinfo(t, "--list", "nbd://"+host)
	require.Len(t, listed, 1)
	assert.Equal(t, "vm 1", listed[0].Name)
	assert.Equal(t, "the first disk", listed[0].Description)

	// The default export is this one too; any other name is refused.
	assert.Equal(t, "vm 1", nbdinfo(t, "nbd://"+host+"/")[0].Name)
	_, stderr, code := testproc.Run(t, nil, testserver.Tool(t, "nbdinfo"), "nbd://"+host+"/vm2")
	assert.NotZero(t, code)
	assert.Contains(t, stderr, "vm2")

	// read and write, by URI, reach the same bytes.
	res := runCLI(t, nil, "read", uri, "--from", "4096", "--size", "8192")
	require.Zero(t, res.code, string(res.stderr))
	assert.Equal(t, data[4096:4096+8192], res.stdout)
	patch := randomData(512, 8)
	res = runCLI(t, patch, "write", uri, "--from", "512", "--size", "512")
	require.Zero(t, res.code, string(res.stderr))
	res = runCLI(t, nil, "read", "nbd://"+host+"/", "-F", "512", "-S", "512")
	require.Zero(t, res.code, string(res.stderr))
	assert.Equal(t, patch, res.stdout)
	res = runCLI(t, nil, "read", "nbd://"+host+"/vm2", "-F", "0", "-S", "512")
	assert.Equal(t, 1, res.code)
	assert.Contains(t, requireOneLine(t, res.stderr), "vm2")

	p.Signal(t, syscall.SIGTERM)
	assert.Zero(t, p.Wait(t))
}

// serve and listen take --unix; the printed nbd+unix URI works for
// nbdinfo and for flexnbd read, and the socket file goes with the server.
func TestUnixSocket(t *testing.T) {
	data := randomData(64<<10, 9)
	file := scratch(t, 64<<10, data)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	p := testproc.Start(t, "", flexnbdBin, "serve", "--unix", sock, "-f", file, "--print-uri")
	uri := printedURI(t, p)
	assert.Equal(t, "nbd+unix:///?socket="+strings.ReplaceAll(sock, "/", "%2F"), uri)
	assert.Equal(t, uint64(64<<10), nbdinfo(t, uri)[0].Size)
	res := runCLI(t, nil, "read", uri, "-F", "0", "-S", "4096")
	require.Zero(t, res.code, string(res.stderr))
	assert.Equal(t, data[:4096], res.stdout)
	// A second server must not steal a live socket.
	res = runCLI(t, nil, "serve", "--unix", sock, "-f", file)
	assert.Equal(t, 1, res.code)
	assert.Contains(t, requireOneLine(t, res.stderr), "address already in use")
	p.Signal(t, syscall.SIGTERM)
	assert.Zero(t, p.Wait(t))
	_, err := os.Stat(sock)
	assert.ErrorIs(t, err, os.ErrNotExist)

	// A killed server leaves its socket file; the next one replaces it.
	p = testproc.Start(t, "", flexnbdBin, "serve", "--unix", sock, "-f", file, "--print-uri")
	printedURI(t, p)
	p.Signal(t, syscall.SIGKILL)
	p.Wait(t)
	_, err = os.Stat(sock)
	require.NoError(t, err, "the killed server's socket is still there")
	p = testproc.Start(t, "", flexnbdBin, "serve", "--unix", sock, "-f", file, "--print-uri")
	assert.Equal(t, uint64(64<<10), nbdinfo(t, printedURI(t, p))[0].Size)
	p.Signal(t, syscall.SIGTERM)
	assert.Zero(t, p.Wait(t))

	dsock := filepath.Join(t.TempDir(), "dest.sock")
	d := testproc.Start(t, "", flexnbdBin, "listen", "--unix", dsock, "-f", scratch(t, 64<<10, nil), "--print-uri",
		"--export-name", "incoming")
	assert.Equal(t, "nbd+unix:///incoming?socket="+strings.ReplaceAll(dsock, "/", "%2F"), printedURI(t, d))
	d.Signal(t, syscall.SIGTERM)
	assert.Equal(t, 1, d.Wait(t), "stopped before any migration")
}

// A relative --unix path is printed absolute: the URI is for clients,
// whose working directory is not the server's.
func TestPrintURIRelativeUnixSocket(t *testing.T) {
	dir := t.TempDir()
	cmd := exec.Command(flexnbdBin, "serve", "--unix", "rel.sock", "-f", scratch(t, 64<<10, nil), "--print-uri")
	cmd.Dir = dir
	p := testproc.StartCmd(t, cmd)
	uri := printedURI(t, p)
	assert.Equal(t, "nbd+unix:///?socket="+strings.ReplaceAll(filepath.Join(dir, "rel.sock"), "/", "%2F"), uri)
	assert.Equal(t, uint64(64<<10), nbdinfo(t, uri)[0].Size)
	p.Signal(t, syscall.SIGTERM)
	assert.Zero(t, p.Wait(t))
}

// A start-up that fails once the NBD socket exists (here on a metrics
// address that cannot be listened on) removes the socket file again, in
// every mode that listens.
func TestFailedStartRemovesTheUnixSocket(t *testing.T) {
	for _, mode := range [][]string{
		{"serve", "-f", scratch(t, 64<<10, nil)},
		{"listen", "-f", scratch(t, 64<<10, nil)},
		{"proxy", "-C", "127.0.0.1", "-P", "1"},
	} {
		t.Run(mode[0], func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "nbd.sock")
			res := runCLI(t, nil, append(mode, "--unix", sock, "--metrics", "127.0.0.1:99999")...)
			assert.Equal(t, 1, res.code)
			assert.Contains(t, requireOneLine(t, res.stderr), "99999")
			assert.NoFileExists(t, sock)
		})
	}
	t.Run("control socket", func(t *testing.T) {
		sock := filepath.Join(t.TempDir(), "nbd.sock")
		res := runCLI(t, nil, "serve", "-f", scratch(t, 64<<10, nil), "--unix", sock,
			"-s", filepath.Join(t.TempDir(), "missing", "ctl.sock"))
		assert.Equal(t, 1, res.code)
		requireOneLine(t, res.stderr)
		assert.NoFileExists(t, sock)
	})
}

// A Unix socket path given as --addr takes --port 0, the port the C
// tools pass when there is none, as it did before --port could be told
// absent; any other port is an error.
func TestUnixAddrWithPortZero(t *testing.T) {
	for _, mode := range [][]string{
		{"proxy", "-C", "127.0.0.1", "-P", "1"},
		{"serve", "-f", scratch(t, 64<<10, nil)},
	} {
		t.Run(mode[0], func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "nbd.sock")
			p := testproc.Start(t, "", flexnbdBin, append(mode, "--addr", sock, "--port", "0", "--print-uri")...)
			assert.Equal(t, "nbd+unix:///?socket="+strings.ReplaceAll(sock, "/", "%2F"), printedURI(t, p))
			p.Signal(t, syscall.SIGTERM)
			assert.Zero(t, p.Wait(t))

			res := runCLI(t, nil, append(mode, "--addr", sock, "--port", "10809")...)
			assert.Equal(t, 1, res.code)
			assert.Contains(t, requireOneLine(t, res.stderr), "--port")
		})
	}
}

// The listening flags: exactly one of TCP and Unix, one line and exit 1
// otherwise; the same for the URI of read and write.
func TestListenFlagErrors(t *testing.T) {
	file := scratch(t, 1<<20, nil)
	sock := filepath.Join(t.TempDir(), "x.sock")
	for _, tc := range []struct {
		name string
		args []string
		want string
	}{
		{"serve without address", []string{"serve", "-f", file}, "--unix"},
		{"serve with both", []string{"serve", "-l", "127.0.0.1", "-p", "0", "--unix", sock, "-f", file}, "--unix does not go"},
		{"listen without address", []string{"listen", "-f", file}, "--unix"},
		{"listen with both", []string{"listen", "-p", "0", "--unix", sock, "-f", file}, "--unix does not go"},
		{"proxy without address", []string{"proxy", "-C", "127.0.0.1", "-P", "1"}, "--unix"},
		{"proxy with both", []string{"proxy", "-l", "127.0.0.1", "-p", "0", "--unix", sock, "-C", "127.0.0.1", "-P", "1"}, "--unix does not go"},
		{"export name too long", []string{"serve", "--unix", sock, "-f", file, "--export-name", strings.Repeat("n", 4097)}, "4096 bytes"},
		{"read without target", []string{"read", "-F", "0", "-S", "1"}, "URI"},
		{"read with both", []string{"read", "nbd://127.0.0.1/", "-l", "127.0.0.1", "-p", "1", "-F", "0", "-S", "1"}, "not both"},
		{"read over TLS", []string{"read", "nbds://127.0.0.1/", "-F", "0", "-S", "1"}, "TLS"},
		{"write bad URI", []string{"write", "nbd://127.0.0.1/?size=1", "-F", "0", "-S", "1"}, "size"},
		{"read bind on unix", []string{"read", "nbd+unix:///?socket=" + sock, "-b", "127.0.0.1", "-F", "0", "-S", "1"}, "--bind"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := runCLI(t, nil, tc.args...)
			assert.Equal(t, 1, res.code)
			assert.Empty(t, res.stdout)
			assert.Contains(t, requireOneLine(t, res.stderr), tc.want)
		})
	}
	_, err := os.Stat(sock)
	assert.ErrorIs(t, err, os.ErrNotExist, "nothing listened")
}

// notifySocket is the NOTIFY_SOCKET a service manager gives a Type=notify
// service: a datagram socket that receives one state list per message.
type notifySocket struct {
	path string
	conn *net.UnixConn
}

func newNotifySocket(t *testing.T) *notifySocket {
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return &notifySocket{path: path, conn: c}
}

// waitFor reads messages until one holds the state want, and returns the
// messages read on the way.
func (n *notifySocket) waitFor(t *testing.T, want string) []string {
	t.Helper()
	var seen []string
	buf := make([]byte, 4096)
	require.NoError(t, n.conn.SetReadDeadline(time.Now().Add(testproc.Timeout)))
	for {
		k, err := n.conn.Read(buf)
		require.NoError(t, err, "waiting for %s after %q", want, seen)
		msg := string(buf[:k])
		seen = append(seen, msg)
		for _, s := range strings.Split(msg, "\n") {
			if s == want {
				return seen
			}
		}
	}
}

// activated runs flexnbd as systemd does with a socket unit: the test's
// listener as descriptor 3, LISTEN_FDS=1 and LISTEN_PID naming the
// process itself, which a shell that execs knows as $$.
func activated(t *testing.T, l net.Listener, notify string, args ...string) *testproc.Proc {
	t.Helper()
	f, err := l.(interface{ File() (*os.File, error) }).File()
	require.NoError(t, err)
	defer f.Close()
	cmd := exec.Command("sh", append([]string{"-c", `LISTEN_PID=$$ exec "$0" "$@"`, flexnbdBin}, args...)...)
	cmd.Env = append(os.Environ(), "LISTEN_FDS=1", "NOTIFY_SOCKET="+notify)
	cmd.ExtraFiles = []*os.File{f}
	return testproc.StartCmd(t, cmd)
}

// A socket-activated serve, with no address flags, serves the passed
// socket (TCP or Unix) to nbdinfo and flexnbd read, and tells the
// manager READY=1 once it does, its status, and STOPPING=1 when told to
// stop.
func TestSocketActivation(t *testing.T) {
	data := randomData(1<<20, 11)
	file := scratch(t, 1<<20, data)
	for _, network := range []string{"tcp", "unix"} {
		t.Run(network, func(t *testing.T) {
			addr := "127.0.0.1:0"
			if network == "unix" {
				addr = filepath.Join(t.TempDir(), "activated.sock")
			}
			l, err := net.Listen(network, addr)
			require.NoError(t, err)
			defer l.Close()
			n := newNotifySocket(t)
			ctl := filepath.Join(t.TempDir(), "ctl.sock")
			p := activated(t, l, n.path, "serve", "-f", file, "-s", ctl, "--print-uri", "--export-name", "disk")
			n.waitFor(t, "READY=1")
			_, err = os.Stat(ctl)
			require.NoError(t, err, "the control socket is up by READY=1")

			uri := printedURI(t, p)
			var want string
			if network == "tcp" {
				want = "nbd://" + l.Addr().String() + "/disk"
			} else {
				want = "nbd+unix:///disk?socket=" + strings.ReplaceAll(addr, "/", "%2F")
			}
			assert.Equal(t, want, uri)
			assert.Equal(t, "disk", nbdinfo(t, uri)[0].Name)
			res := runCLI(t, nil, "read", uri, "-F", "8192", "-S", "4096")
			require.Zero(t, res.code, string(res.stderr))
			assert.True(t, bytes.Equal(data[8192:8192+4096], res.stdout))

			p.Signal(t, syscall.SIGTERM)
			seen := n.waitFor(t, "STOPPING=1")
			assert.Contains(t, seen, "STATUS=serving 0 clients", "the status line follows READY=1")
			assert.Zero(t, p.Wait(t))
		})
	}
}

// Activation stands in for the address flags: giving both is an error.
func TestSocketActivationWithAddressFlags(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	p := activated(t, l, "", "serve", "-f", scratch(t, 1<<20, nil), "-l", "127.0.0.1", "-p", "0")
	assert.Equal(t, 1, p.Wait(t))
	assert.Contains(t, requireOneLine(t, []byte(p.Stderr.Text())), "socket activation")
}

// systemd-socket-activate, systemd's own tool for running a service the
// way a socket unit would, starts flexnbd on the first connection and
// that connection is served.
func TestSystemdSocketActivate(t *testing.T) {
	tool := testserver.Tool(t, "systemd-socket-activate")
	data := randomData(1<<20, 12)
	file := scratch(t, 1<<20, data)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	p := testproc.Start(t, "", tool, "-l", sock, flexnbdBin, "serve", "-f", file)
	p.Stderr.WaitFor(t, "Listening on")
	res := runCLI(t, nil, "read", "nbd+unix:///?socket="+sock, "-F", "0", "-S", "65536")
	require.Zero(t, res.code, string(res.stderr))
	assert.Equal(t, data[:65536], res.stdout)
	p.Signal(t, syscall.SIGTERM)
	assert.Zero(t, p.Wait(t))
}

// The proxy is activated the same way and tells the manager it is ready.
func TestProxySocketActivation(t *testing.T) {
	data := randomData(1<<20, 13)
	up := startServe(t, scratch(t, 1<<20, data), true)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	n := newNotifySocket(t)
	p := activated(t, l, n.path, "proxy", "-C", "127.0.0.1", "-P", strconv.Itoa(up.port))
	n.waitFor(t, "READY=1")
	res := runCLI(t, nil, "read", "nbd://"+l.Addr().String(), "-F", "0", "-S", "4096")
	require.Zero(t, res.code, string(res.stderr))
	assert.Equal(t, data[:4096], res.stdout)
	p.Signal(t, syscall.SIGTERM)
	n.waitFor(t, "STOPPING=1")
	assert.Zero(t, p.Wait(t))
	assert.Zero(t, up.stop(t, syscall.SIGTERM))
}
