// Package localtcp tunes TCP connections whose two ends are on the same
// host: a client on loopback, or one that dialled one of this host's own
// addresses from that same address (the kernel carries both over the
// loopback device). A client on this host that binds a different address of
// the host than the one it dials is not recognised and keeps the host's
// congestion control.
//
// Such a connection crosses no network, yet it inherits the host's
// congestion control. When that is BBR, every burst of data is paced by a
// kernel timer, and the timer's softirq sends segments from another CPU,
// which reorders them and makes the receiver work harder. Measured with
// 1 MiB reads at queue depth 8 on two cores, pacing cost a third of the
// throughput (docs/DESIGN.md). Loss-based algorithms (CUBIC, Reno) do not
// pace, and on a link without loss they never hold data back.
package localtcp

import (
	"errors"
	"net"
	"net/netip"
	"strings"

	"golang.org/x/sys/unix"
)

// IsLocal reports whether both ends of c are on this host: the peer is a
// loopback address, or the same address as the local end.
func IsLocal(c *net.TCPConn) bool {
	return sameHost(addrOf(c.LocalAddr()), addrOf(c.RemoteAddr()))
}

func sameHost(local, remote netip.Addr) bool {
	if !local.IsValid() || !remote.IsValid() {
		return false
	}
	return remote.IsLoopback() || local == remote
}

func addrOf(a net.Addr) netip.Addr {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.Addr{}
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return netip.Addr{}
	}
	return ip.Unmap()
}

// unpaced lists the algorithms to switch to, best first. The kernel lets an
// unprivileged process pick only those in
// net.ipv4.tcp_allowed_congestion_control; Reno is always among them.
var unpaced = []string{"cubic", "reno"}

// paces reports whether the named congestion control paces its sending.
func paces(name string) bool { return strings.HasPrefix(name, "bbr") }

// AvoidPacing switches c away from a pacing congestion control. It returns
// the algorithm c uses afterwards, and whether it changed; an algorithm
// that does not pace is left alone. Callers decide with IsLocal: on a real
// network pacing is what BBR is for.
func AvoidPacing(c *net.TCPConn) (algorithm string, changed bool, err error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return "", false, err
	}
	var opErr error
	err = rc.Control(func(fd uintptr) {
		algorithm, changed, opErr = avoidPacing(int(fd))
	})
	if err == nil {
		err = opErr
	}
	return algorithm, changed, err
}

func avoidPacing(fd int) (string, bool, error) {
	current, err := unix.GetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION)
	if err != nil {
		return "", false, err
	}
	if !paces(current) {
		return current, false, nil
	}
	var errs []error
	for _, name := range unpaced {
		err := unix.SetsockoptString(fd, unix.IPPROTO_TCP, unix.TCP_CONGESTION, name)
		if err == nil {
			return name, true, nil
		}
		errs = append(errs, err)
	}
	return current, false, errors.Join(errs...)
}
