// Package testproc builds the flexnbd command once per test binary and
// runs it as real processes: for tests that need signals, exit codes,
// several hosts or a terminal, which an in-process server cannot show.
package testproc

import (
	"bytes"
	"context"
	"fmt"
	"io"
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
)

// Timeout bounds every wait on a process, so that a bug fails a test
// instead of hanging it; nothing waits for it to pass.
const Timeout = 90 * time.Second

// Build compiles the flexnbd command into a
// temporary directory and returns the binary's path and a cleanup. With
// race, the binary is built with the race detector.
func Build(race bool) (bin string, cleanup func(), err error) {
	tmp, err := os.MkdirTemp("", "flexnbd-bin")
	if err != nil {
		return "", nil, err
	}
	bin = filepath.Join(tmp, "flexnbd")
	args := []string{"build", "-o", bin}
	if race {
		args = append(args, "-race")
		// A race-enabled program sleeps a second at exit so late reports
		// can be printed; the tests wait for every exit.
		os.Setenv("GORACE", strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	}
	out, err := exec.Command("go", append(args, "github.com/flexnbd/flexnbd/cmd/flexnbd")...).CombinedOutput()
	if err != nil {
		os.RemoveAll(tmp)
		return "", nil, fmt.Errorf("building flexnbd: %v\n%s", err, out)
	}
	return bin, func() { os.RemoveAll(tmp) }, nil
}

// Proc is a running flexnbd (or any command).
type Proc struct {
	Cmd    *exec.Cmd
	Stdout *Lines
	Stderr *Lines
	done   chan struct{}
	code   int
}

// Start runs name with args, in the network namespace ns unless it is "".
// The process is killed when the test ends, if it is still running.
func Start(t testing.TB, ns, name string, args ...string) *Proc {
	t.Helper()
	if ns != "" {
		args = append([]string{"netns", "exec", ns, name}, args...)
		name = "ip"
	}
	return StartCmd(t, exec.Command(name, args...))
}

// StartCmd starts cmd, which may carry an environment and extra files,
// and collects its output as Start does.
func StartCmd(t testing.TB, cmd *exec.Cmd) *Proc {
	t.Helper()
	name, args := cmd.Path, cmd.Args[1:]
	p := &Proc{Cmd: cmd, Stdout: NewLines(), Stderr: NewLines(), done: make(chan struct{})}
	p.Cmd.Stdout, p.Cmd.Stderr = p.Stdout, p.Stderr
	if err := p.Cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", name, err)
	}
	go func() {
		err := p.Cmd.Wait()
		p.code = 0
		if ee, ok := err.(*exec.ExitError); ok {
			p.code = ee.ExitCode()
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				p.code = 128 + int(ws.Signal())
			}
		} else if err != nil {
			p.code = -1
		}
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			_ = p.Cmd.Process.Kill()
			<-p.done
			if t.Failed() {
				t.Logf("%s %s was still running; its stderr:\n%s", name, strings.Join(args, " "), p.Stderr.Text())
			}
		}
	})
	return p
}

// Signal sends sig.
func (p *Proc) Signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	if err := p.Cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// Wait returns the exit status once the process has exited (128+N for a
// process killed by signal N).
func (p *Proc) Wait(t testing.TB) int {
	t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(Timeout):
		t.Fatalf("%s did not exit; stderr:\n%s", p.Cmd.Path, p.Stderr.Text())
		return -1
	}
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Lines collects output and lets a test wait for a line.
type Lines struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{} // closed and replaced on every write
}

// NewLines returns an empty collector.
func NewLines() *Lines { return &Lines{changed: make(chan struct{})} }

func (l *Lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	close(l.changed)
	l.changed = make(chan struct{})
	return len(p), nil
}

// Text is everything written so far.
func (l *Lines) Text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}

// WaitFor waits until the output contains substr.
func (l *Lines) WaitFor(t testing.TB, substr string) {
	t.Helper()
	timer := time.NewTimer(Timeout)
	defer timer.Stop()
	for {
		l.mu.Lock()
		found := strings.Contains(l.buf.String(), substr)
		changed := l.changed
		l.mu.Unlock()
		if found {
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			t.Fatalf("output never contained %q:\n%s", substr, l.Text())
		}
	}
}

// Line returns the first complete line containing substr, waiting until
// one is written, stop is closed, or timeout passes.
func (l *Lines) Line(substr string, stop <-chan struct{}, timeout time.Duration) (string, bool) {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	find := func() (string, bool, chan struct{}) {
		l.mu.Lock()
		defer l.mu.Unlock()
		text := l.buf.String()
		if i := strings.LastIndexByte(text, '\n'); i >= 0 {
			for _, line := range strings.Split(text[:i], "\n") {
				if strings.Contains(line, substr) {
					return line, true, nil
				}
			}
		}
		return "", false, l.changed
	}
	for {
		line, ok, changed := find()
		if ok {
			return line, true
		}
		select {
		case <-changed:
		case <-stop:
			// The line may have come just before the end.
			line, ok, _ = find()
			return line, ok
		case <-timer.C:
			return "", false
		}
	}
}

// Run runs a command to completion and returns its stdout, stderr and
// exit status.
func Run(t testing.TB, stdin io.Reader, name string, args ...string) (string, string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("%s %s timed out", name, strings.Join(args, " "))
	}
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	return stdout.String(), stderr.String(), code
}

// FreePort returns a TCP port of 127.0.0.1 that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}

// Itoa is strconv.Itoa, for building argument lists.
func Itoa(n int) string { return strconv.Itoa(n) }

// Main is a TestMain for packages that run the command: it builds it
// (with the race detector when race), stores its path in *bin, runs the
// tests and exits with their status.
func Main(m *testing.M, race bool, bin *string) {
	b, cleanup, err := Build(race)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	*bin = b
	code := m.Run()
	cleanup()
	os.Exit(code)
}
