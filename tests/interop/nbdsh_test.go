package interop

import (
	"bytes"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/server"
)

// badRequests runs inside nbdsh, where h is a handle already connected
// with base:allocation, and `cases` was set by an earlier -c to the names
// of the cases to run. Strict mode off lets libnbd send requests it would
// normally refuse on the client side. Each bad request must fail with the
// expected errno, and the same handle must then still read the first
// sector correctly: an error reply, not a dropped connection. The exit
// status is the number of failed checks.
const badRequests = `
import errno, sys
h.set_strict_mode(0)
size = h.get_size()
good = bytes([0x5a]) * 512
failures = 0
def expect(name, want, call):
    global failures
    try:
        call()
        print("FAIL %s: succeeded, want %s" % (name, errno.errorcode[want]))
        failures += 1
    except nbd.Error as e:
        if e.errnum != want:
            print("FAIL %s: errno %s (%s), want %s" % (name, e.errnum, e.errno, errno.errorcode[want]))
            failures += 1
        else:
            print("ok %s: %s" % (name, e.errno))
    try:
        got = h.pread(512, 0)
        if got != good:
            print("FAIL %s: first sector changed" % name)
            failures += 1
    except nbd.Error as e:
        print("FAIL %s: read after the error: %s" % (name, e))
        failures += 1
all_cases = {
    "read past end": (errno.EINVAL, lambda: h.pread(512, size - 256)),
    "read at end": (errno.EINVAL, lambda: h.pread(1, size)),
    "trim past end": (errno.EINVAL, lambda: h.trim(4096, size - 512)),
    "block status past end": (errno.EINVAL, lambda: h.block_status(4096, size, lambda *a: 0)),
    "write past end": (errno.ENOSPC, lambda: h.pwrite(b"x" * 1024, size - 512)),
    "write zeroes past end": (errno.ENOSPC, lambda: h.zero(1024, size - 512)),
    "unknown flag bit": (errno.EINVAL, lambda: h.pread(512, 0, flags=1 << 7)),
    "flag of another command": (errno.EINVAL, lambda: h.pread(512, 0, flags=nbd.CMD_FLAG_NO_HOLE)),
    "read offset overflow": (errno.EINVAL, lambda: h.pread(512, 2**64 - 256)),
    "write offset overflow": (errno.ENOSPC, lambda: h.pwrite(b"y" * 512, 2**64 - 256)),
    "write on read-only": (errno.EPERM, lambda: h.pwrite(b"z" * 512, 0)),
    "trim on read-only": (errno.EPERM, lambda: h.trim(512, 0)),
    "write zeroes on read-only": (errno.EPERM, lambda: h.zero(512, 0)),
}
for name in cases:
    want, call = all_cases[name]
    expect(name, want, call)
sys.exit(failures)
`

// TestNbdshErrors sends deliberately invalid requests with libnbd and
// checks the errno of each reply, and that the connection survives it.
func TestNbdshErrors(t *testing.T) {
	tests := []struct {
		name     string
		readOnly bool
		cases    []string
	}{
		{"read-write", false, []string{
			"read past end", "read at end", "trim past end", "block status past end",
			"write past end", "write zeroes past end", "unknown flag bit", "flag of another command",
			"read offset overflow", "write offset overflow",
		}},
		{"read-only", true, []string{
			"write on read-only", "trim on read-only", "write zeroes on read-only", "read past end",
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			img := writeTemp(t, "export.img", nil)
			require.NoError(t, os.Truncate(img, 16<<20))
			f, err := os.OpenFile(img, os.O_WRONLY, 0)
			require.NoError(t, err)
			_, err = f.WriteAt(bytes.Repeat([]byte{0x5a}, 512), 0)
			require.NoError(t, err)
			require.NoError(t, f.Close())
			inst := testserver.Start(t, testserver.Options{Path: img, Config: server.Config{ReadOnly: tc.readOnly}})

			quoted := make([]string, len(tc.cases))
			for i, c := range tc.cases {
				quoted[i] = fmt.Sprintf("%q", c)
			}
			out, err := testserver.RunErr(t, toolTimeout, testserver.Python(t), "-m", "nbd", "--base-allocation",
				"-u", inst.URI(), "-c", "cases = ["+strings.Join(quoted, ", ")+"]", "-c", badRequests)
			require.NoError(t, err, "nbdsh reported failures:\n%s", out)
			ok := 0
			for _, line := range strings.Split(out, "\n") {
				if strings.HasPrefix(line, "ok ") {
					ok++
				}
			}
			assert.Equal(t, len(tc.cases), ok, out)
			// Every refusal came from the server, not from libnbd.
			assert.Equal(t, uint64(len(tc.cases)), inst.Server.Stats().Errors, out)
		})
	}
}
