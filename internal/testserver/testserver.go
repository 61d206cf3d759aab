// Package testserver starts flexnbd servers and locates NBD tools for
// tests. It is shared by the unit, interop and command-line tests so that
// each of them starts servers and finds tools the same way.
package testserver

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// Instance is a running in-process server.
type Instance struct {
	Server *server.Server
	// Addr is host:port of the listener.
	Addr string
	// Path is the file behind the export (empty for a custom backend).
	Path string
	File *server.File
}

// URI returns the nbd:// URI of the export.
func (i *Instance) URI() string { return "nbd://" + i.Addr + "/" }

// Options tune Start. The zero value serves a new sparse 64 MiB file.
type Options struct {
	// Size of the sparse file to create; default 64 MiB.
	Size int64
	// Path serves an existing file instead of creating one.
	Path string
	// Config is the server configuration; Backend is filled in unless set.
	Config server.Config
	// ListenAddr defaults to 127.0.0.1:0.
	ListenAddr string
}

// Start serves an export until the test ends, then shuts it down and
// checks that the shutdown was clean.
func Start(t testing.TB, opts Options) *Instance {
	t.Helper()
	inst := &Instance{}
	cfg := opts.Config
	if cfg.Backend == nil {
		path := opts.Path
		if path == "" {
			size := opts.Size
			if size == 0 {
				size = 64 << 20
			}
			path = filepath.Join(t.TempDir(), "export.img")
			f, err := os.Create(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := f.Truncate(size); err != nil {
				t.Fatal(err)
			}
			f.Close()
		}
		file, err := server.OpenFile(path, cfg.ReadOnly)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { file.Close() })
		cfg.Backend = file
		inst.File = file
		inst.Path = path
	}
	if os.Getenv("FLEXNBD_TEST_LOG") != "" {
		// The zero Logger in cfg writes nowhere; FLEXNBD_TEST_LOG=1
		// shows the server's log in the test output instead.
		cfg.Logger = zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.DebugLevel)
	}
	addr := opts.ListenAddr
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	inst.Addr = l.Addr().String()
	inst.Server = server.New(cfg)
	served := make(chan error, 1)
	go func() { served <- inst.Server.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := inst.Server.Shutdown(ctx); err != nil {
			t.Errorf("server shutdown: %v", err)
		}
		if err := <-served; !errors.Is(err, server.ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return inst
}

// Dial connects our own client to the instance.
func (i *Instance) Dial(t testing.TB, opts *nbd.ClientOptions) *nbd.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := nbd.Dial(ctx, "tcp", i.Addr, opts)
	if err != nil {
		t.Fatalf("dial %s: %v", i.Addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// Tool returns the path of an external program the tests need. The
// environment variable FLEXNBD_<NAME> (upper case, '-' as '_') overrides
// the lookup. A missing tool fails the test: CI installs them all, and a
// silent skip would hide a gap. FLEXNBD_ALLOW_MISSING_TOOLS=1 turns the
// failure into a skip for machines that cannot install them.
func Tool(t testing.TB, name string) string {
	t.Helper()
	env := "FLEXNBD_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
	if p := os.Getenv(env); p != "" {
		return p
	}
	p, err := exec.LookPath(name)
	if err == nil {
		return p
	}
	msg := fmt.Sprintf("%s not found (install it, see .ci/run, or set %s)", name, env)
	if os.Getenv("FLEXNBD_ALLOW_MISSING_TOOLS") == "1" {
		t.Skip(msg)
	}
	t.Fatal(msg)
	return ""
}

// Python returns the Debian python3 that has the libnbd bindings (nbdsh
// needs it; another python3 may come first on PATH).
func Python(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("FLEXNBD_PYTHON3"); p != "" {
		return p
	}
	if _, err := os.Stat("/usr/bin/python3"); err == nil {
		return "/usr/bin/python3"
	}
	return Tool(t, "python3")
}

// Run runs a command with a deadline and returns its combined output,
// failing the test with that output if it does not succeed.
func Run(t testing.TB, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	out, err := RunErr(t, timeout, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// RunErr is Run without failing: for commands expected to fail. The
// command runs in a temporary directory of its own: tools leave files in
// their working directory (fio its verify state, for one), which would
// otherwise land in the package directory, inside the repository.
func RunErr(t testing.TB, timeout time.Duration, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return string(out), fmt.Errorf("timed out after %v: %w", timeout, err)
	}
	return string(out), err
}
