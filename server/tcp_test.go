package server_test

import (
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
)

// A client on this host gets replies without congestion-control pacing,
// whatever the host's default algorithm is.
func TestLocalClientIsNotPaced(t *testing.T) {
	// Sockets start with the host's default algorithm: unless that one
	// paces, the server has nothing to undo and the check below would
	// pass whatever the server does.
	const sysctl = "/proc/sys/net/ipv4/tcp_congestion_control"
	def, err := os.ReadFile(sysctl)
	if err != nil {
		t.Skipf("cannot tell the default congestion control: %v", err)
	}
	if name := strings.TrimSpace(string(def)); !strings.Contains(name, "bbr") {
		t.Skipf("the default congestion control is %q, which does not pace; this test needs BBR (sysctl net.ipv4.tcp_congestion_control=bbr)", name)
	}
	ss := testserver.Tool(t, "ss")
	inst := testserver.Start(t, testserver.Options{})
	c := inst.Dial(t, nil)
	roundTrip(t, c, 0, 1)

	_, port, err := net.SplitHostPort(inst.Addr)
	require.NoError(t, err)
	out := testserver.Run(t, 10*time.Second, ss, "-H", "-t", "-i", "state", "established", "( sport = :"+port+" )")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 2, "one server-side socket: its address line and its info line:\n%s", out)
	algorithm := strings.Fields(lines[1])[0]
	assert.NotContains(t, algorithm, "bbr", "the server's side of a loopback connection paces:\n%s", out)
	assert.NotContains(t, algorithm, ":", "expected the algorithm's name first:\n%s", out)
}
