package main

import (
	"encoding/json"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
)

// ctlResult is how a command ended.
type ctlResult struct {
	stdout, stderr string
	code           int
}

// ctlRun runs the binary to completion.
func ctlRun(t *testing.T, args ...string) ctlResult {
	t.Helper()
	stdout, stderr, code := testproc.Run(t, nil, flexnbdBin, args...)
	return ctlResult{stdout, stderr, code}
}

// ctlProcess is a running `flexnbd serve --sock`.
type ctlProcess struct {
	*testproc.Proc
	addr string // NBD listen address
}

// ctlStartServe starts serve on a fresh export and returns once its log
// says the control socket is ready.
func ctlStartServe(t *testing.T, sock string) *ctlProcess {
	t.Helper()
	img := filepath.Join(t.TempDir(), "export.img")
	require.NoError(t, os.WriteFile(img, make([]byte, 1<<20), 0o644))
	p := &ctlProcess{Proc: testproc.Start(t, "", flexnbdBin,
		"serve", "-l", "127.0.0.1", "-p", "0", "-f", img, "-s", sock, "-v", "--log-format", "json")}
	_, ok := p.Stderr.Line(`"message":"control socket ready"`, p.Done(), testproc.Timeout)
	require.True(t, ok, "serve did not get ready:\n%s", p.Stderr.Text())
	line, ok := p.Stderr.Line(`"message":"serving"`, p.Done(), testproc.Timeout)
	require.True(t, ok, "serve did not log its address:\n%s", p.Stderr.Text())
	var ev struct{ Listen string }
	require.NoError(t, json.Unmarshal([]byte(line), &ev))
	p.addr = ev.Listen
	return p
}

// stop sends SIGTERM and returns the exit code.
func (p *ctlProcess) stop(t *testing.T) int {
	t.Helper()
	p.Signal(t, syscall.SIGTERM)
	return p.Wait(t)
}

// TestCLIControl runs the control modes of the real binary against a real
// `flexnbd serve --sock`.
func TestCLIControl(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the binary")
	}
	sock := filepath.Join(t.TempDir(), "ctl.sock")
	p := ctlStartServe(t, sock)
	pid := strconv.Itoa(p.Cmd.Process.Pid)

	t.Run("socket is private and the NBD port already listens", func(t *testing.T) {
		fi, err := os.Lstat(sock)
		require.NoError(t, err)
		require.Equal(t, fs.ModeSocket, fi.Mode().Type())
		require.Equal(t, fs.FileMode(0o600), fi.Mode().Perm())
		c, err := net.DialTimeout("tcp", p.addr, testproc.Timeout)
		require.NoError(t, err)
		c.Close()
	})

	cStatus := regexp.MustCompile(`^pid=` + pid + ` size=1048576 is_mirroring=false clients_allowed=true num_clients=\d+ has_control=true uptime=\d+ `)
	tests := []struct {
		name   string
		args   []string
		code   int
		stdout *regexp.Regexp // nil: must be empty
		stderr *regexp.Regexp // nil: must be empty
	}{
		{name: "status", args: []string{"status", "--sock", sock}, stdout: cStatus},
		{name: "status short flag", args: []string{"status", "-s", sock}, stdout: cStatus},
		{name: "acl", args: []string{"acl", "-s", sock, "127.0.0.1", "::1"}, stdout: regexp.MustCompile(`^updated\n$`)},
		{name: "acl bad entry", args: []string{"acl", "-s", sock, "127.0.0.1", "bad"}, code: 1,
			stderr: regexp.MustCompile(`^bad spec: bad\n$`)},
		{name: "break", args: []string{"break", "-s", sock}, code: 1, stderr: regexp.MustCompile(`^not mirroring\n$`)},
		{name: "mirror-speed", args: []string{"mirror-speed", "-s", sock, "-m", "1000000"}, code: 1,
			stderr: regexp.MustCompile(`^Not currently mirroring\n$`)},
		{name: "mirror-speed long flag", args: []string{"mirror-speed", "--sock", sock, "--max-speed", "5"}, code: 1,
			stderr: regexp.MustCompile(`^Not currently mirroring\n$`)},
		{name: "unreachable socket", args: []string{"status", "-s", sock + ".missing"}, code: 1,
			stderr: regexp.MustCompile(`^flexnbd: cannot reach control socket \S+\.missing: no such file or directory\n$`)},
		{name: "socket flag required", args: []string{"status"}, code: 1, stderr: regexp.MustCompile(`--sock`)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := ctlRun(t, tt.args...)
			require.Equal(t, tt.code, r.code, "stdout %q stderr %q", r.stdout, r.stderr)
			for _, s := range []struct {
				name, got string
				want      *regexp.Regexp
			}{{"stdout", r.stdout, tt.stdout}, {"stderr", r.stderr, tt.stderr}} {
				if s.want == nil {
					require.Empty(t, s.got, s.name)
				} else {
					require.Regexp(t, s.want, s.got, s.name)
				}
			}
		})
	}

	t.Run("status --json", func(t *testing.T) {
		r := ctlRun(t, "status", "-s", sock, "--json")
		require.Equal(t, 0, r.code, r.stderr)
		require.Empty(t, r.stderr)
		require.True(t, strings.HasSuffix(r.stdout, "}\n"), "one JSON object on one line")
		require.Equal(t, 1, strings.Count(r.stdout, "\n"))
		var st map[string]any
		require.NoError(t, json.Unmarshal([]byte(r.stdout), &st))
		require.Equal(t, float64(p.Cmd.Process.Pid), st["pid"])
		require.Equal(t, float64(1<<20), st["size"])
		require.Equal(t, false, st["is_mirroring"])
		require.Equal(t, true, st["has_control"])
		require.IsType(t, float64(0), st["num_clients"])
		require.IsType(t, float64(0), st["bytes_written"])
		require.True(t, strings.HasPrefix(r.stdout, `{"pid":`+pid+`,"size":1048576,"is_mirroring":false,"clients_allowed":true,"num_clients":`), r.stdout)
	})

	t.Run("a second instance on the live socket fails", func(t *testing.T) {
		img := filepath.Join(t.TempDir(), "other.img")
		require.NoError(t, os.WriteFile(img, make([]byte, 4096), 0o644))
		r := ctlRun(t, "serve", "-l", "127.0.0.1", "-p", "0", "-f", img, "-s", sock)
		require.Equal(t, 1, r.code)
		require.Contains(t, r.stderr, "in use by a running process")
		require.Equal(t, 0, ctlRun(t, "status", "-s", sock).code, "the first instance still answers")
	})

	t.Run("socket removed on exit", func(t *testing.T) {
		require.Equal(t, 0, p.stop(t))
		_, err := os.Lstat(sock)
		require.ErrorIs(t, err, fs.ErrNotExist)
	})

	t.Run("stale socket replaced", func(t *testing.T) {
		stale := filepath.Join(t.TempDir(), "stale.sock")
		l, err := net.ListenUnix("unix", &net.UnixAddr{Name: stale, Net: "unix"})
		require.NoError(t, err)
		l.SetUnlinkOnClose(false)
		require.NoError(t, l.Close())

		p := ctlStartServe(t, stale)
		r := ctlRun(t, "status", "-s", stale)
		require.Equal(t, 0, r.code, r.stderr)
		require.Contains(t, r.stdout, "pid="+strconv.Itoa(p.Cmd.Process.Pid)+" ")
		require.Equal(t, 0, p.stop(t))
	})

	t.Run("a file that is not a socket is left alone", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "notes")
		require.NoError(t, os.WriteFile(path, []byte("keep me"), 0o644))
		img := filepath.Join(t.TempDir(), "x.img")
		require.NoError(t, os.WriteFile(img, make([]byte, 4096), 0o644))
		r := ctlRun(t, "serve", "-l", "127.0.0.1", "-p", "0", "-f", img, "-s", path)
		require.Equal(t, 1, r.code)
		require.Contains(t, r.stderr, "not a socket")
		data, err := os.ReadFile(path)
		require.NoError(t, err)
		require.Equal(t, "keep me", string(data))
	})

	t.Run("exit status is the reply code", func(t *testing.T) {
		for _, tt := range []struct {
			answer string
			code   int
			stderr string
		}{
			{"9: missing command\n", 9, "missing command\n"},
			{"10: unknown command\n", 10, "unknown command\n"},
			{"garbage\n", 1, "flexnbd: control: malformed reply \"garbage\"\n"},
		} {
			path := filepath.Join(t.TempDir(), "fake.sock")
			l, err := net.Listen("unix", path)
			require.NoError(t, err)
			go func() {
				c, err := l.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				_, _ = io.WriteString(c, tt.answer)
			}()
			r := ctlRun(t, "break", "-s", path)
			l.Close()
			require.Equal(t, tt.code, r.code, tt.answer)
			require.Empty(t, r.stdout)
			require.Equal(t, tt.stderr, r.stderr)
		}
	})
}
