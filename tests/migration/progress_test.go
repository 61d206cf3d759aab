package migration

import (
	"bytes"
	"io"
	"os/exec"
	"strings"
	"testing"

	"github.com/creack/pty"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
)

// On a terminal `mirror --wait` draws a progress bar (bytes done of the
// export, speed, pass and mode, time left) and ends with the outcome.
func TestMirrorWaitOnATerminal(t *testing.T) {
	const size = 12 << 20
	src := serve(t, "", "127.0.0.1", image(t, size, size, 9))
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0))
	cmd := exec.Command(bin, "mirror", "--sock", src.sock, "--addr", dst.addr, "--port", testproc.Itoa(dst.port),
		"--max-speed", testproc.Itoa(6<<20), "--wait")
	tty, err := pty.Start(cmd)
	require.NoError(t, err)
	defer tty.Close()
	var out bytes.Buffer
	_, _ = io.Copy(&out, tty) // until the command exits and the pty reports EIO
	require.NoError(t, cmd.Wait(), out.String())
	text := out.String()
	assert.Contains(t, text, "pass 1 copy", "the bar's description")
	assert.Contains(t, text, "MiB", "bytes with units")
	assert.Contains(t, text, "%", "the share done")
	assert.Contains(t, text, "ETA")
	assert.Contains(t, text, "mirror completed")
	assert.Equal(t, 0, exitCode(t, src.proc))
}

// Elsewhere (a pipe, a log file) it prints plain lines instead, a few
// seconds apart, then the outcome on standard output.
func TestMirrorWaitOnAPipe(t *testing.T) {
	const size = 12 << 20
	src := serve(t, "", "127.0.0.1", image(t, size, size, 10))
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0))
	out, errOut, code := src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port),
		"--max-speed", testproc.Itoa(4<<20), "--wait")
	require.Equal(t, 0, code, "%s%s", out, errOut)
	assert.True(t, strings.HasPrefix(out, "mirror completed: "), out)
	assert.Contains(t, errOut, "migration: pass=1 mode=copy done=")
	assert.NotContains(t, errOut, "\r", "no terminal control on a pipe")
	for _, line := range strings.Split(strings.TrimSpace(errOut), "\n") {
		assert.True(t, strings.HasPrefix(line, "migration: "), "unexpected line %q", line)
	}
}
