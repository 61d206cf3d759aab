package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
)

// startUnderSystemd starts serve with a runtime directory as systemd's
// RuntimeDirectory= gives one, and waits for its control socket.
func startUnderSystemd(t *testing.T, runtimeDir, sock string) *testproc.Proc {
	t.Helper()
	img := scratch(t, 1<<20, randomData(1<<20, 11))
	cmd := exec.Command(flexnbdBin, "serve", "-l", "127.0.0.1", "-p", "0", "-f", img, "-s", sock,
		"-v", "--log-format", "json")
	cmd.Env = append(os.Environ(), "RUNTIME_DIRECTORY="+runtimeDir)
	p := testproc.StartCmd(t, cmd)
	_, ok := p.Stderr.Line(`"message":"control socket ready"`, p.Done(), testproc.Timeout)
	require.True(t, ok, "serve did not get ready:\n%s", p.Stderr.Text())
	return p
}

// A serve that handed its export off leaves the marker the unit's
// ExecStopPost= stops the socket unit on; one stopped by a signal keeps
// the export and leaves none, so the socket goes on starting it.
func TestHandOffMarker(t *testing.T) {
	t.Run("migration", func(t *testing.T) {
		runtimeDir := t.TempDir()
		sock := filepath.Join(t.TempDir(), "ctl.sock")
		src := startUnderSystemd(t, runtimeDir, sock)

		port := testproc.FreePort(t)
		dst := testproc.Start(t, "", flexnbdBin, "listen", "-l", "127.0.0.1", "-p", strconv.Itoa(port),
			"-f", scratch(t, 1<<20, nil), "-v", "--log-format", "json")
		_, ok := dst.Stderr.Line(`"message":"waiting for a migration"`, dst.Done(), testproc.Timeout)
		require.True(t, ok, "listen did not get ready:\n%s", dst.Stderr.Text())

		res := runCLI(t, nil, "mirror", "-s", sock, "-l", "127.0.0.1", "-p", strconv.Itoa(port), "-w")
		require.Zero(t, res.code, string(res.stderr))
		require.Zero(t, src.Wait(t), src.Stderr.Text())
		require.Zero(t, dst.Wait(t), dst.Stderr.Text())
		assert.FileExists(t, filepath.Join(runtimeDir, "handed-off"))
	})
	t.Run("signal", func(t *testing.T) {
		runtimeDir := t.TempDir()
		src := startUnderSystemd(t, runtimeDir, filepath.Join(t.TempDir(), "ctl.sock"))
		src.Signal(t, syscall.SIGTERM)
		require.Zero(t, src.Wait(t), src.Stderr.Text())
		entries, err := os.ReadDir(runtimeDir)
		require.NoError(t, err)
		assert.Empty(t, entries)
	})
}

// The unit's ExecStopPost= command, run as systemd would run it (with a
// systemctl that records its arguments), stops the socket unit and
// removes the marker when there is one, and does nothing otherwise.
func TestServiceStopsItsSocketAfterAHandOff(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "..", "contrib", "systemd", "flexnbd@.service"))
	require.NoError(t, err)
	unit := string(b)
	require.Contains(t, unit, "\nRuntimeDirectory=flexnbd/%i\n")
	var post string
	for _, line := range strings.Split(unit, "\n") {
		if v, ok := strings.CutPrefix(line, "ExecStopPost="); ok {
			post = v
		}
	}
	script, ok := strings.CutPrefix(post, "+/bin/sh -c ")
	require.True(t, ok, "ExecStopPost=%s", post)
	runRoot, bin := t.TempDir(), t.TempDir()
	script = strings.Trim(script, "'")
	script = strings.ReplaceAll(strings.ReplaceAll(script, "%t", runRoot), "%i", "vm1")
	calls := filepath.Join(bin, "calls")
	require.NoError(t, os.WriteFile(filepath.Join(bin, "systemctl"),
		[]byte("#!/bin/sh\necho \"$@\" >>"+calls+"\n"), 0o755))
	runtimeDir := filepath.Join(runRoot, "flexnbd", "vm1")
	require.NoError(t, os.MkdirAll(runtimeDir, 0o755))
	stopPost := func() {
		cmd := exec.Command("/bin/sh", "-c", script)
		cmd.Env = append(os.Environ(), "PATH="+bin+":"+os.Getenv("PATH"))
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, string(out))
	}

	stopPost()
	assert.NoFileExists(t, calls, "no marker: the socket stays")

	require.NoError(t, os.WriteFile(filepath.Join(runtimeDir, "handed-off"), nil, 0o600))
	stopPost()
	got, err := os.ReadFile(calls)
	require.NoError(t, err)
	assert.Equal(t, "--no-block stop flexnbd@vm1.socket\n", string(got))
	assert.NoFileExists(t, filepath.Join(runtimeDir, "handed-off"))
}
