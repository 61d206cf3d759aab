package localtcp

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestSameHost(t *testing.T) {
	for _, tc := range []struct {
		local, remote string
		want          bool
	}{
		{"127.0.0.1", "127.0.0.1", true},
		{"127.0.0.1", "127.0.0.2", true},
		{"::1", "::1", true},
		{"10.1.2.3", "10.1.2.3", true}, // a client dialling our own address
		{"10.1.2.3", "10.1.2.4", false},
		{"2001:db8::1", "2001:db8::2", false},
		{"10.1.2.3", "::ffff:10.1.2.3", true}, // mapped by a dual-stack socket
	} {
		got := sameHost(netip.MustParseAddr(tc.local).Unmap(), netip.MustParseAddr(tc.remote).Unmap())
		assert.Equal(t, tc.want, got, "%s <- %s", tc.local, tc.remote)
	}
	assert.False(t, sameHost(netip.Addr{}, netip.MustParseAddr("127.0.0.1")))
}

// pair returns both ends of a fresh loopback connection.
func pair(t *testing.T, network, addr string) (server, client *net.TCPConn) {
	t.Helper()
	l, err := net.Listen(network, addr)
	require.NoError(t, err)
	defer l.Close()
	cc, err := net.Dial(network, l.Addr().String())
	require.NoError(t, err)
	sc, err := l.Accept()
	require.NoError(t, err)
	t.Cleanup(func() { cc.Close(); sc.Close() })
	return sc.(*net.TCPConn), cc.(*net.TCPConn)
}

func congestion(t *testing.T, c *net.TCPConn) string {
	t.Helper()
	rc, err := c.SyscallConn()
	require.NoError(t, err)
	var name string
	var opErr error
	require.NoError(t, rc.Control(func(fd uintptr) {
		name, opErr = unix.GetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	}))
	require.NoError(t, opErr)
	return name
}

func setCongestion(c *net.TCPConn, name string) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var opErr error
	if err := rc.Control(func(fd uintptr) {
		opErr = unix.SetsockoptString(int(fd), unix.IPPROTO_TCP, unix.TCP_CONGESTION, name)
	}); err != nil {
		return err
	}
	return opErr
}

func TestLoopbackIsLocal(t *testing.T) {
	s, c := pair(t, "tcp4", "127.0.0.1:0")
	assert.True(t, IsLocal(s))
	assert.True(t, IsLocal(c))
	s6, _ := pair(t, "tcp6", "[::1]:0")
	assert.True(t, IsLocal(s6))
}

func TestAvoidPacingReplacesBBR(t *testing.T) {
	s, _ := pair(t, "tcp4", "127.0.0.1:0")
	if err := setCongestion(s, "bbr"); errors.Is(err, unix.ENOENT) {
		t.Skip("this kernel has no BBR, so nothing here paces")
	} else {
		require.NoError(t, err)
	}
	name, changed, err := AvoidPacing(s)
	require.NoError(t, err)
	assert.True(t, changed)
	assert.Contains(t, unpaced, name)
	assert.Equal(t, name, congestion(t, s), "the socket itself must have switched")
}

func TestAvoidPacingLeavesOthersAlone(t *testing.T) {
	s, _ := pair(t, "tcp4", "127.0.0.1:0")
	require.NoError(t, setCongestion(s, "reno"))
	name, changed, err := AvoidPacing(s)
	require.NoError(t, err)
	assert.False(t, changed)
	assert.Equal(t, "reno", name)
	assert.Equal(t, "reno", congestion(t, s))
}

func TestAvoidPacingOnClosedConn(t *testing.T) {
	s, _ := pair(t, "tcp4", "127.0.0.1:0")
	s.Close()
	_, changed, err := AvoidPacing(s)
	assert.Error(t, err)
	assert.False(t, changed)
}
