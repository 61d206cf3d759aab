package metrics

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/internal/testproc"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
)

// outOfRange asks nbdsh for one read past the end, which libnbd would
// refuse itself in strict mode, and prints the error it got back.
const outOfRange = `
h.set_strict_mode(0)
try:
    h.pread(4096, h.get_size())
    print("read past the end succeeded")
except nbd.Error as e:
    print("errno", e.errno)
`

// Writes from qemu-io are counted exactly, by command and bytes, with as
// many latency observations; a read nbdsh sends past the end is counted
// as a read that failed with EINVAL and moved nothing; a connected client
// shows.
func TestServeCountsRequests(t *testing.T) {
	const writes = 8
	p := start(t, "serving", "serve", "--addr", "127.0.0.1", "--port", "0", "--file", image(t, 4<<20),
		"--metrics", "127.0.0.1:0")
	addr, uri := p.field(t, "metrics"), "nbd://"+p.field(t, "listen")

	before := scrape(t, addr)
	assert.Zero(t, value(t, before, "flexnbd_requests_total", "command", "write"))
	assert.Zero(t, value(t, before, "flexnbd_clients"))

	args := []string{"-f", "raw", "-t", "writeback"}
	for i := range writes {
		args = append(args, "-c", fmt.Sprintf("write -P 0x5a %d 4k", i*8192))
	}
	out := testserver.Run(t, toolTimeout, testserver.Tool(t, "qemu-io"), append(args, uri)...)
	require.Equal(t, writes, strings.Count(out, "wrote 4096/4096"), out)

	fams := scrape(t, addr)
	assert.Equal(t, float64(writes), value(t, fams, "flexnbd_requests_total", "command", "write"))
	assert.Equal(t, float64(writes*4096), value(t, fams, "flexnbd_request_bytes_total", "command", "write"))
	assert.Equal(t, float64(writes), value(t, fams, "flexnbd_request_duration_seconds", "command", "write"))
	assert.Zero(t, value(t, fams, "flexnbd_requests_total", "command", "read"))
	assert.Zero(t, value(t, fams, "flexnbd_request_errors_total", "errno", "EINVAL"))

	out = testserver.Run(t, toolTimeout, testserver.Python(t), "-m", "nbd", "-u", uri, "-c", outOfRange)
	require.Contains(t, out, "errno EINVAL", "the server's answer to a read past the end")
	fams = scrape(t, addr)
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_requests_total", "command", "read"))
	assert.Zero(t, value(t, fams, "flexnbd_request_bytes_total", "command", "read"))
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_request_errors_total", "errno", "EINVAL"))
	assert.Zero(t, value(t, fams, "flexnbd_request_errors_total", "errno", "EIO"))
	assert.Equal(t, float64(writes), value(t, fams, "flexnbd_requests_total", "command", "write"))

	ctx := context.Background()
	c, err := nbd.Dial(ctx, "tcp", p.field(t, "listen"), nil)
	require.NoError(t, err)
	defer c.Close()
	fams = scrape(t, addr)
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_clients"))
	// The standard collectors come along.
	assert.Positive(t, value(t, fams, "process_open_fds"))
	assert.Positive(t, value(t, fams, "go_goroutines"))
}

// A bad --metrics address is a one-line error and exit status 1 in every
// mode that takes it.
func TestBadMetricsAddress(t *testing.T) {
	file := image(t, 1<<20)
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"serve", []string{"serve", "--addr", "127.0.0.1", "--port", "0", "--file", file}},
		{"listen", []string{"listen", "--addr", "127.0.0.1", "--port", "0", "--file", file}},
		{"proxy", []string{"proxy", "--addr", "127.0.0.1", "--port", itoa(testproc.FreePort(t)),
			"--conn-addr", "127.0.0.1", "--conn-port", "1"}},
	} {
		for _, bad := range []string{"no-port", "127.0.0.1:99999", "192.0.2.1:9100"} {
			t.Run(tc.name+"/"+bad, func(t *testing.T) {
				_, stderr, code := testproc.Run(t, nil, bin, append(tc.args, "--metrics", bad)...)
				assert.Equal(t, 1, code, stderr)
				assert.Equal(t, 1, strings.Count(stderr, "\n"), "one line: %q", stderr)
				assert.Contains(t, stderr, "--metrics")
			})
		}
	}
}

// The source of a migration shows its progress as the control socket
// reports it while the copy runs, and that it stopped after a break.
func TestMigrationFiguresOnTheSource(t *testing.T) {
	const size, limit = 16 << 20, 2 << 20
	srcFile := image(t, size)
	// Data all along: a hole would be skipped faster than the limit.
	require.NoError(t, os.WriteFile(srcFile, bytes.Repeat([]byte{0x5a}, size), 0o644))
	sock := filepath.Join(t.TempDir(), "src.sock")
	src := start(t, "serving", "serve", "--addr", "127.0.0.1", "--port", "0", "--file", srcFile, "--sock", sock,
		"--metrics", "127.0.0.1:0")
	dst := start(t, "waiting for a migration", "listen", "--addr", "127.0.0.1", "--port", "0", "--file", image(t, size),
		"--metrics", "127.0.0.1:0")
	addr := src.field(t, "metrics")
	assert.Zero(t, value(t, scrape(t, addr), "flexnbd_migration_active"))

	_, port, _ := strings.Cut(dst.field(t, "listen"), ":")
	_, errOut, code := testproc.Run(t, nil, bin, "mirror", "--sock", sock, "--addr", "127.0.0.1", "--port", port,
		"--max-speed", itoa(limit))
	require.Equal(t, 0, code, errOut)
	waitMetric(t, addr, "the copy to be under way", func(v float64) bool { return v >= 1<<20 },
		"flexnbd_migration_sent_bytes")

	before := status(t, sock)
	fams := scrape(t, addr)
	after := status(t, sock)
	sent := value(t, fams, "flexnbd_migration_sent_bytes")
	assert.GreaterOrEqual(t, sent, statusNum(t, before, "migration_bytes_sent"))
	assert.LessOrEqual(t, sent, statusNum(t, after, "migration_bytes_sent"))
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_migration_active"))
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_migration_mode", "mode", "copy"))
	assert.Zero(t, value(t, fams, "flexnbd_migration_mode", "mode", "freeze"))
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_migration_attempts"))
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_migration_pass"))
	assert.Equal(t, float64(limit), value(t, fams, "flexnbd_migration_speed_limit_bytes_per_second"))
	dirty := value(t, fams, "flexnbd_migration_dirty_bytes")
	assert.Positive(t, dirty)
	assert.LessOrEqual(t, dirty, float64(size))

	_, errOut, code = testproc.Run(t, nil, bin, "break", "--sock", sock)
	require.Equal(t, 0, code, errOut)
	fams = scrape(t, addr)
	assert.Zero(t, value(t, fams, "flexnbd_migration_active"))
	assert.Zero(t, value(t, fams, "flexnbd_migration_mode", "mode", "copy"))
	assert.GreaterOrEqual(t, value(t, fams, "flexnbd_migration_sent_bytes"), sent)
	// The destination counted every write it acknowledged to the source.
	assert.GreaterOrEqual(t, value(t, scrape(t, dst.field(t, "metrics")), "flexnbd_request_bytes_total",
		"command", "write"), sent)

	src.Signal(t, syscall.SIGTERM)
	assert.Equal(t, 0, src.Wait(t), src.Stderr.Text())
	dst.Signal(t, syscall.SIGTERM)
	dst.Wait(t)
}

// status returns the control socket's status fields by name.
func status(t *testing.T, sock string) map[string]string {
	t.Helper()
	c := control.Client{Path: sock, Timeout: toolTimeout}
	r, fields, err := c.Status(context.Background())
	require.NoError(t, err)
	require.True(t, r.OK(), r.String())
	m := make(map[string]string, len(fields))
	for _, f := range fields {
		m[f.Key] = f.Value
	}
	return m
}

func statusNum(t *testing.T, st map[string]string, key string) float64 {
	t.Helper()
	n, err := strconv.ParseFloat(st[key], 64)
	require.NoError(t, err, "status field %s in %v", key, st)
	return n
}

// A proxy whose upstream was killed and started again counts one
// reconnection for its one client, which is connected again.
func TestProxyCountsReconnects(t *testing.T) {
	file := image(t, 4<<20)
	upPort := itoa(testproc.FreePort(t))
	serveArgs := []string{"serve", "--addr", "127.0.0.1", "--port", upPort, "--file", file}
	up := start(t, "serving", serveArgs...)
	p := start(t, "proxying", "proxy", "--addr", "127.0.0.1", "--port", itoa(testproc.FreePort(t)),
		"--conn-addr", "127.0.0.1", "--conn-port", upPort, "--metrics", "127.0.0.1:0")
	addr := p.field(t, "metrics")
	assert.Zero(t, value(t, scrape(t, addr), "flexnbd_proxy_reconnects_total"))

	ctx := context.Background()
	c, err := nbd.Dial(ctx, "tcp", p.field(t, "listen"), nil)
	require.NoError(t, err)
	defer c.Close()
	block := make([]byte, 4096)
	require.NoError(t, c.Write(ctx, block, 0, 0))
	fams := scrape(t, addr)
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_proxy_clients"))
	assert.Zero(t, value(t, fams, "flexnbd_proxy_reconnects_total"))

	up.Signal(t, syscall.SIGKILL)
	up.Wait(t)
	start(t, "serving", serveArgs...)
	require.NoError(t, c.Write(ctx, block, 4096, 0), "a write across the restart")

	fams = scrape(t, addr)
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_proxy_reconnects_total"))
	assert.Equal(t, float64(1), value(t, fams, "flexnbd_proxy_connected_clients"))
	assert.Zero(t, value(t, fams, "flexnbd_proxy_failed_requests_total"))
}
