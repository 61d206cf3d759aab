package server_test

import (
	"fmt"
	"os"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestMain fails the run if server goroutines outlive the tests: a
// connection or watchdog that never ends is a leak in a long-running
// daemon, whichever test caused it.
func TestMain(m *testing.M) {
	if dir := os.Getenv(oneProcessorServerEnv); dir != "" {
		os.Exit(serveOnOneProcessor(dir))
	}
	code := m.Run()
	if code == 0 {
		if leaked := serverGoroutines(5 * time.Second); leaked != "" {
			fmt.Fprintf(os.Stderr, "server goroutines still running after the tests:\n%s\n", leaked)
			code = 1
		}
	}
	os.Exit(code)
}

// serverGoroutines waits up to wait for the package's goroutines to end
// and returns the stacks of those that did not.
func serverGoroutines(wait time.Duration) string {
	deadline := time.Now().Add(wait)
	for {
		buf := make([]byte, 1<<20)
		buf = buf[:runtime.Stack(buf, true)]
		var leaked []string
		for _, g := range strings.Split(string(buf), "\n\n") {
			if strings.Contains(g, "flexnbd/flexnbd/server.(") {
				leaked = append(leaked, g)
			}
		}
		if len(leaked) == 0 || time.Now().After(deadline) {
			return strings.Join(leaked, "\n\n")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
