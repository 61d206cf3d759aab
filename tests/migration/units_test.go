package migration

import (
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
)

// mirror --max-speed and mirror-speed take sizes with units: a bare letter
// is binary, as in qemu-img; spelled-out units keep their meaning; what is
// no size at all reaches the server, which refuses it as the C tool does.
func TestSpeedLimitsWithUnits(t *testing.T) {
	const size = 16 << 20
	src := serve(t, "", "127.0.0.1", image(t, size, size, 21))
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0))
	_, errOut, code := src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port), "--max-speed", "1M")
	require.Equal(t, 0, code, errOut)
	st := src.waitStatus(t, "the copy", sentAtLeast(64<<10))
	assert.Equal(t, testproc.Itoa(1<<20), st["migration_speed_limit"])

	for _, tc := range []struct{ arg, want string }{
		{"2MiB", testproc.Itoa(2 << 20)},
		{"3MB", "3000000"},
		{"1.5M", testproc.Itoa(3 << 19)},
		{"1048577", "1048577"},
	} {
		_, errOut, code = src.ctl(t, "mirror-speed", "--max-speed", tc.arg)
		require.Equal(t, 0, code, "%s: %s", tc.arg, errOut)
		src.waitStatus(t, "limit "+tc.arg, func(st map[string]string) bool { return st["migration_speed_limit"] == tc.want })
	}
	out, errOut, code := src.ctl(t, "mirror-speed", "--max-speed", "fast")
	assert.Equal(t, 1, code)
	assert.Empty(t, out)
	assert.Equal(t, 1, strings.Count(errOut, "\n"), "one line: %q", errOut)

	_, errOut, code = src.ctl(t, "break")
	require.Equal(t, 0, code, errOut)
}

// Progress lines on a pipe carry the byte counts with units beside the
// exact numbers, one word each.
func TestMirrorWaitProgressWithUnits(t *testing.T) {
	const size = 12 << 20
	src := serve(t, "", "127.0.0.1", image(t, size, size, 22))
	dst := listen(t, "", "127.0.0.1", image(t, size, 0, 0))
	out, errOut, code := src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port),
		"--max-speed", "4M", "--wait")
	require.Equal(t, 0, code, "%s%s", out, errOut)
	line := regexp.MustCompile(`(?m)^migration: .* done=(\d+)/12582912 .* done_human=(\S+)/12MiB speed_human=\S+/s$`)
	m := line.FindStringSubmatch(errOut)
	require.NotNil(t, m, "no progress line with units in:\n%s", errOut)
	assert.Regexp(t, `^\d+(\.\d)?[KM]?i?B$`, m[2])
}
