package migration

import (
	"context"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
)

// The whole job as an operator runs it: clients write to the source,
// `mirror --wait` follows the migration to its end, both sides exit 0,
// and every write a client saw acknowledged is on the destination.
func TestMigrationWithClientsWriting(t *testing.T) {
	const size = 64 << 20
	src := serve(t, "", "127.0.0.1", image(t, size, 24<<20, 1))
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0))
	st := dst.status(t)
	assert.Equal(t, "false", st["has_control"])

	ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
	defer cancel()
	s := &testserver.Stamper{Blocks: 1024}
	writers := make(chan struct{})
	go func() { s.Run(ctx, t, src.target(), 4, 0); close(writers) }()
	time.Sleep(50 * time.Millisecond)

	out, errOut, code := src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port), "--wait")
	require.Equal(t, 0, code, "mirror --wait: %s%s\n%s", out, errOut, logs(src))
	assert.Contains(t, out, "mirror completed")
	assert.Equal(t, 0, exitCode(t, src.proc), logs(src))
	assert.Equal(t, 0, exitCode(t, dst.proc), logs(dst))
	<-writers
	require.Positive(t, s.Writes())
	s.Verify(t, dst.file)
	requireSameFile(t, src.file, dst.file)
	assert.Contains(t, logs(src), "hand-off complete")
}

// The destination is killed three times in the middle of a pass and
// started again; the source retries every time and completes.
func TestDestinationKilledAndRestarted(t *testing.T) {
	const size = 32 << 20
	src := serve(t, "", "127.0.0.1", image(t, size, size, 2))
	dstFile := image(t, size, 0, 0)
	dst := listen(t, "", "127.0.0.1", dstFile)

	_, errOut, code := src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port), "--max-speed", testproc.Itoa(16<<20))
	require.Equal(t, 0, code, errOut)
	attempt, sent := int64(1), int64(0)
	for kill := 1; kill <= 3; kill++ {
		// Mid-pass of a new attempt: it has sent a MiB of its own.
		st := src.waitStatus(t, "the copy to be under way", func(st map[string]string) bool {
			return num(st, "migration_attempts") >= attempt && num(st, "migration_bytes_sent") >= sent+1<<20 &&
				st["migration_mode"] == "copy"
		})
		attempt, sent = num(st, "migration_attempts")+1, num(st, "migration_bytes_sent")
		dst.proc.Signal(t, syscall.SIGKILL)
		dst.proc.Wait(t)
		// Until it is back, attempts fail to connect and back off.
		src.waitStatus(t, "the retry", func(st map[string]string) bool { return st["migration_mode"] == "retry" })
		dst.restart(t, "listen", "")
	}
	_, errOut, code = src.ctl(t, "mirror-speed", "--max-speed", "0")
	require.Equal(t, 0, code, errOut)
	assert.Equal(t, 0, exitCode(t, src.proc), logs(src))
	assert.Equal(t, 0, exitCode(t, dst.proc), logs(dst))
	requireSameFile(t, src.file, dst.file)
	assert.GreaterOrEqual(t, strings.Count(logs(src), "migration attempt started"), 4)
}

// SIGTERM on the source mid-migration: it exits 1, keeps its file, and
// the destination is still waiting (not complete); SIGTERM there exits 1.
func TestSignalsMidMigration(t *testing.T) {
	const size = 16 << 20
	srcFile := image(t, size, size, 3)
	want, err := os.ReadFile(srcFile)
	require.NoError(t, err)
	src := serve(t, "", "127.0.0.1", srcFile)
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0))
	_, errOut, code := src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port), "--max-speed", testproc.Itoa(4<<20))
	require.Equal(t, 0, code, errOut)
	src.waitStatus(t, "the copy", sentAtLeast(1<<20))

	src.proc.Signal(t, syscall.SIGTERM)
	assert.Equal(t, 1, exitCode(t, src.proc), "serve stopped while mirroring")
	got, err := os.ReadFile(srcFile)
	require.NoError(t, err)
	assert.Equal(t, want, got)

	st := dst.status(t)
	require.NotNil(t, st)
	assert.Equal(t, "false", st["has_control"])
	dst.proc.Signal(t, syscall.SIGTERM)
	assert.Equal(t, 1, exitCode(t, dst.proc), "listen stopped before its migration completed")
}

// `break` stops the migration and the source serves on; a second mirror
// afterwards completes. mirror-speed changes the limit in flight.
func TestBreakThenMirrorAgain(t *testing.T) {
	const size = 16 << 20
	src := serve(t, "", "127.0.0.1", image(t, size, size, 4))
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0))
	_, _, code := src.ctl(t, "break")
	assert.Equal(t, 1, code, "break without a migration")

	_, errOut, code := src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port), "--max-speed", testproc.Itoa(2<<20))
	require.Equal(t, 0, code, errOut)
	st := src.waitStatus(t, "the copy", sentAtLeast(256<<10))
	assert.Equal(t, testproc.Itoa(2<<20), st["migration_speed_limit"])
	_, errOut, code = src.ctl(t, "mirror-speed", "--max-speed", testproc.Itoa(3<<20))
	require.Equal(t, 0, code, errOut)
	st = src.waitStatus(t, "the new limit", func(st map[string]string) bool { return st["migration_speed_limit"] == testproc.Itoa(3<<20) })

	out, errOut, code := src.ctl(t, "break")
	require.Equal(t, 0, code, errOut)
	assert.Equal(t, "mirror stopped\n", out)
	st = src.status(t)
	assert.Equal(t, "false", st["is_mirroring"])
	assert.Equal(t, "true", st["clients_allowed"])

	c, err := nbd.Dial(context.Background(), "tcp", src.target(), nil)
	require.NoError(t, err)
	require.NoError(t, c.Write(context.Background(), make([]byte, 4096), 0, nbd.CmdFlagFUA))
	require.NoError(t, c.Close())

	out, errOut, code = src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port), "--wait")
	require.Equal(t, 0, code, "%s%s", out, errOut)
	assert.Equal(t, 0, exitCode(t, src.proc))
	assert.Equal(t, 0, exitCode(t, dst.proc))
	requireSameFile(t, src.file, dst.file)
}

// --unlink removes the source file; --then-serve keeps the destination
// serving every client, real NBD tools included.
func TestUnlinkAndThenServe(t *testing.T) {
	const size = 8 << 20
	srcFile := image(t, size, 4<<20, 5)
	want, err := os.ReadFile(srcFile)
	require.NoError(t, err)
	src := serve(t, "", "127.0.0.1", srcFile)
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0), "--then-serve")

	// Before the hand-off an ordinary client is turned away in the
	// handshake, and told why (libnbd shows only the error code).
	nbdinfo := testserver.Tool(t, "nbdinfo")
	_, _, code := testproc.Run(t, nil, nbdinfo, "nbd://"+dst.target())
	require.NotEqual(t, 0, code)
	qemuIO := testserver.Tool(t, "qemu-io")
	out, errOut, code := testproc.Run(t, nil, qemuIO, "-f", "raw", "-c", "read 0 4k", "nbd://"+dst.target())
	require.NotEqual(t, 0, code)
	assert.Contains(t, out+errOut, "serving only its migration source")

	out, errOut, code = src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port), "--unlink", "--wait")
	require.Equal(t, 0, code, "%s%s", out, errOut)
	assert.Equal(t, 0, exitCode(t, src.proc))
	_, err = os.Stat(srcFile)
	assert.True(t, os.IsNotExist(err), "the source file is removed")

	st := dst.waitStatus(t, "control", func(st map[string]string) bool { return st["has_control"] == "true" })
	assert.Equal(t, "false", st["is_mirroring"])
	out, errOut, code = testproc.Run(t, nil, qemuIO, "-f", "raw", "-c", "read -v 0 16", "nbd://"+dst.target())
	require.Equal(t, 0, code, "%s%s", out, errOut)
	got, err := os.ReadFile(dst.file)
	require.NoError(t, err)
	assert.Equal(t, want, got)
	dst.proc.Signal(t, syscall.SIGTERM)
	assert.Equal(t, 0, exitCode(t, dst.proc), "a destination that took over stops like serve")
}

// The control socket's `nothing` action completes the copy and keeps
// serving; the status shows the freeze afterwards.
func TestMirrorNothingKeepsServing(t *testing.T) {
	const size = 8 << 20
	src := serve(t, "", "127.0.0.1", image(t, size, size, 6))
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0))
	c := controlClient(src.sock)
	r, err := c.Do(context.Background(), "mirror_wait", dst.addr, testproc.Itoa(dst.port), "nothing")
	require.NoError(t, err)
	require.True(t, r.OK(), r.String())
	assert.Equal(t, 0, exitCode(t, dst.proc))
	st := src.status(t)
	assert.Equal(t, "false", st["is_mirroring"])
	assert.Contains(t, st, "migration_last_freeze_ms")
	requireSameFile(t, src.file, dst.file)
	cl, err := nbd.Dial(context.Background(), "tcp", src.target(), nil)
	require.NoError(t, err)
	require.NoError(t, cl.Write(context.Background(), make([]byte, 4096), 0, 0))
	require.NoError(t, cl.Close())
	src.proc.Signal(t, syscall.SIGTERM)
	assert.Equal(t, 0, exitCode(t, src.proc))
}

// A mirror that cannot start says why, in the C flexnbd's words, and
// leaves is_mirroring false (the C flexnbd leaves it true).
func TestMirrorStartFailures(t *testing.T) {
	const size = 4 << 20
	src := serve(t, "", "127.0.0.1", image(t, size, size, 7))
	_, errOut, code := src.ctl(t, "mirror", "--addr", "127.0.0.1", "--port", testproc.Itoa(testproc.FreePort(t)))
	assert.Equal(t, 1, code)
	assert.Equal(t, "Mirror failed to connect\n", errOut)
	assert.Equal(t, "false", src.status(t)["is_mirroring"])

	_, errOut, code = src.ctl(t, "mirror", "--addr", "127.0.0.1", "--port", testproc.Itoa(src.port))
	assert.Equal(t, 1, code)
	assert.Equal(t, "the destination is this server\n", errOut)

	small := listen(t, "", "127.0.0.1", image(t, size/2, 0, 0))
	_, errOut, code = src.ctl(t, "mirror", "--addr", small.addr, "--port", testproc.Itoa(small.port))
	assert.Equal(t, 1, code)
	assert.Equal(t, "Remote size does not match local size\n", errOut)
	assert.Equal(t, "false", src.status(t)["is_mirroring"])
	assert.Equal(t, "false", small.status(t)["has_control"], "a refused source does not complete the destination")
}

// A destination stopped (SIGSTOP) past the request timeout is given up
// and retried; once it runs again the old connection can deliver nothing
// that the new attempt has not overtaken, and the copy is exact.
func TestStoppedDestinationIsRetried(t *testing.T) {
	const size = 16 << 20
	srcFile := image(t, size, size, 8)
	t.Setenv("FLEXNBD_MS_REQUEST_LIMIT_SECS", "0.5") // the source's request timeout
	src := serve(t, "", "127.0.0.1", srcFile)
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0))
	_, errOut, code := src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port), "--max-speed", testproc.Itoa(8<<20))
	require.Equal(t, 0, code, errOut)
	src.waitStatus(t, "the copy", sentAtLeast(2<<20))
	dst.proc.Signal(t, syscall.SIGSTOP)
	src.waitStatus(t, "the stalled attempt to be given up", func(st map[string]string) bool { return st["migration_mode"] == "retry" })
	dst.proc.Signal(t, syscall.SIGCONT)
	_, _, _ = src.ctl(t, "mirror-speed", "--max-speed", "0")
	assert.Equal(t, 0, exitCode(t, src.proc), logs(src))
	assert.Equal(t, 0, exitCode(t, dst.proc), logs(dst))
	requireSameFile(t, srcFile, dst.file)
}
