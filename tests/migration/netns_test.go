package migration

import (
	"fmt"
	"math/rand/v2"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
)

// twoHosts joins two new network namespaces with a veth pair: the source
// host at 198.18.0.1 and the destination host at 198.18.0.2 (a range set
// aside for network tests). It returns the namespaces and a function that
// takes the link down or up again.
func twoHosts(t *testing.T) (srcNS, dstNS string, setLink func(up bool)) {
	t.Helper()
	id := rand.Uint32() % 100000
	srcNS, dstNS = fmt.Sprintf("fnbd-src-%d", id), fmt.Sprintf("fnbd-dst-%d", id)
	srcIf, dstIf := fmt.Sprintf("fnbs%d", id), fmt.Sprintf("fnbd%d", id)
	ip := func(args ...string) error {
		out, err := exec.Command("ip", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
		return nil
	}
	if err := ip("netns", "add", srcNS); err != nil {
		t.Skipf("network namespaces cannot be made here (needs root and iproute2): %v", err)
	}
	t.Cleanup(func() { _ = ip("netns", "del", srcNS) })
	require.NoError(t, ip("netns", "add", dstNS))
	t.Cleanup(func() { _ = ip("netns", "del", dstNS) })
	for _, cmd := range [][]string{
		{"link", "add", srcIf, "type", "veth", "peer", "name", dstIf},
		{"link", "set", srcIf, "netns", srcNS},
		{"link", "set", dstIf, "netns", dstNS},
		{"-n", srcNS, "addr", "add", "198.18.0.1/24", "dev", srcIf},
		{"-n", dstNS, "addr", "add", "198.18.0.2/24", "dev", dstIf},
		{"-n", srcNS, "link", "set", "lo", "up"},
		{"-n", dstNS, "link", "set", "lo", "up"},
		{"-n", srcNS, "link", "set", srcIf, "up"},
		{"-n", dstNS, "link", "set", dstIf, "up"},
	} {
		require.NoError(t, ip(cmd...))
	}
	setLink = func(up bool) {
		state := "down"
		if up {
			state = "up"
		}
		require.NoError(t, ip("-n", srcNS, "link", "set", srcIf, state))
	}
	return srcNS, dstNS, setLink
}

// Source and destination on two hosts; the link between them goes down
// in the middle of a pass for longer than the request timeout. The attempt
// is given up, the migration retries once the link is back, and completes.
func TestLinkCutBetweenTwoHosts(t *testing.T) {
	srcNS, dstNS, setLink := twoHosts(t)
	const size = 32 << 20
	t.Setenv("FLEXNBD_MS_REQUEST_LIMIT_SECS", "1")
	src := serve(t, srcNS, "198.18.0.1", image(t, size, size, 11))
	dst := listen(t, dstNS, "198.18.0.2", image(t, size, 0, 0))

	_, errOut, code := src.ctl(t, "mirror", "--addr", dst.addr, "--port", testproc.Itoa(dst.port),
		"--max-speed", testproc.Itoa(8<<20))
	require.Equal(t, 0, code, errOut)
	src.waitStatus(t, "the copy", sentAtLeast(4<<20))
	setLink(false)
	src.waitStatus(t, "the attempt to be given up", func(st map[string]string) bool { return st["migration_mode"] == "retry" })
	time.Sleep(1500 * time.Millisecond) // reconnects fail while the link is down
	setLink(true)
	_, _, _ = src.ctl(t, "mirror-speed", "--max-speed", "0")
	assert.Equal(t, 0, exitCode(t, src.proc), logs(src))
	assert.Equal(t, 0, exitCode(t, dst.proc), logs(dst))
	requireSameFile(t, src.file, dst.file)
	assert.GreaterOrEqual(t, strings.Count(logs(src), "migration attempt started"), 2)
}
