package acl

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestNewAcceptsEveryForm(t *testing.T) {
	tests := []struct {
		name  string
		entry string
		want  string // normalised form reported by Entries
	}{
		{"ipv4 bare", "10.0.0.1", "10.0.0.1"},
		{"ipv4 prefix", "10.0.0.0/8", "10.0.0.0/8"},
		{"ipv4 prefix host bits masked", "10.1.2.3/8", "10.0.0.0/8"},
		{"ipv4 prefix 1", "128.0.0.0/1", "128.0.0.0/1"},
		{"ipv4 prefix 32 is bare", "10.0.0.1/32", "10.0.0.1"},
		{"ipv6 loopback", "::1", "::1"},
		{"ipv6 link local", "fe80::1", "fe80::1"},
		{"ipv6 uncompressed", "2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"},
		{"ipv6 prefix", "2001:db8::/32", "2001:db8::/32"},
		{"ipv6 prefix host bits masked", "2001:db8::1/32", "2001:db8::/32"},
		{"ipv6 prefix 1", "8000::/1", "8000::/1"},
		{"ipv6 prefix 128 is bare", "::1/128", "::1"},
		{"ipv4-mapped ipv6 bare", "::ffff:10.0.0.1", "::ffff:10.0.0.1"},
		{"ipv4-mapped ipv6 prefix", "::ffff:10.0.0.0/104", "::ffff:10.0.0.0/104"},
		{"bracketed ipv6", "[::1]", "::1"},
		{"bracketed ipv6 with prefix", "[2001:db8::]/32", "2001:db8::/32"},
		{"bracketed ipv4-mapped", "[::ffff:10.0.0.1]", "::ffff:10.0.0.1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := New([]string{tt.entry}, false)
			require.NoError(t, err)
			require.Equal(t, []string{tt.want}, l.Entries())
			require.Equal(t, 1, l.Len())

			again, err := New(l.Entries(), false)
			require.NoError(t, err)
			require.Equal(t, l, again)
		})
	}
}

func TestNewRejectsBadSpecs(t *testing.T) {
	tests := []struct {
		name  string
		entry string
	}{
		{"empty", ""},
		{"ipv4 prefix too long", "10.0.0.1/33"},
		{"ipv6 prefix too long", "::1/129"},
		{"prefix without address", "/8"},
		{"ipv4 prefix zero", "10.0.0.0/0"},
		{"ipv6 prefix zero", "::/0"},
		{"bracketed ipv6 prefix zero", "[::]/0"},
		{"empty prefix length", "10.0.0.0/"},
		{"signed prefix length", "10.0.0.0/+8"},
		{"negative prefix length", "10.0.0.0/-8"},
		{"leading zero prefix length", "10.0.0.0/08"},
		{"two prefix lengths", "10.0.0.0/8/8"},
		{"bracketed ipv4", "[10.0.0.1]"},
		{"bracketed ipv4 with prefix", "[10.0.0.0]/8"},
		{"empty brackets", "[]"},
		{"unclosed bracket", "[::1"},
		{"unopened bracket", "::1]"},
		{"prefix inside brackets", "[::1/64]"},
		{"junk after brackets", "[::1]x"},
		{"port after brackets", "[::1]:80"},
		{"nested brackets", "[[::1]]"},
		{"word", "abc"},
		{"hostname", "localhost"},
		{"trailing space", "1.2.3.4 "},
		{"leading space", " 1.2.3.4"},
		{"trailing newline", "1.2.3.4\n"},
		{"space before prefix", "10.0.0.0 /8"},
		{"space after slash", "10.0.0.0/ 8"},
		{"ipv4 port", "10.0.0.1:80"},
		{"short ipv4", "10.0.1"},
		{"ipv4 octet too big", "10.0.0.256"},
		{"ipv4 leading zero octet", "10.0.0.01"},
		{"zone", "fe80::1%eth0"},
		{"zone with prefix", "fe80::1%eth0/64"},
		{"bracketed zone", "[fe80::1%eth0]"},
		{"bracketed zone with prefix", "[fe80::1%eth0]/64"},
		{"comma separated", "10.0.0.1,10.0.0.2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := New([]string{tt.entry}, false)
			require.Nil(t, l)
			var bad *BadSpecError
			require.ErrorAs(t, err, &bad)
			require.Equal(t, tt.entry, bad.Entry)
			require.EqualError(t, err, "bad spec: "+tt.entry)
		})
	}
}

func TestNewReportsFirstBadEntry(t *testing.T) {
	_, err := New([]string{"10.0.0.1", "nope", "::1", "also-bad"}, false)
	require.EqualError(t, err, "bad spec: nope")
}

func TestBadSpecErrorText(t *testing.T) {
	// The control socket prefixes this with "1: "; any change breaks
	// clients written against the C flexnbd.
	err := error(&BadSpecError{Entry: "1.2.3.4/99"})
	require.Equal(t, "bad spec: 1.2.3.4/99", err.Error())
	require.Equal(t, "1: bad spec: 1.2.3.4/99", fmt.Sprintf("1: %v", err))
}

func TestAllows(t *testing.T) {
	tests := []struct {
		name    string
		entries []string
		peer    string
		want    bool
	}{
		{"ipv4 exact", []string{"10.0.0.1"}, "10.0.0.1", true},
		{"ipv4 exact other", []string{"10.0.0.1"}, "10.0.0.2", false},
		{"ipv4 prefix inside", []string{"10.0.0.0/8"}, "10.255.1.2", true},
		{"ipv4 prefix outside", []string{"10.0.0.0/8"}, "11.0.0.1", false},
		{"ipv4 unmasked entry", []string{"10.9.9.9/8"}, "10.1.1.1", true},
		{"ipv4 /1", []string{"128.0.0.0/1"}, "200.1.1.1", true},
		{"ipv4 /1 outside", []string{"128.0.0.0/1"}, "127.0.0.1", false},
		{"second entry matches", []string{"10.0.0.1", "192.168.0.0/16"}, "192.168.3.4", true},
		{"ipv6 exact", []string{"::1"}, "::1", true},
		{"ipv6 exact other", []string{"::1"}, "::2", false},
		{"ipv6 prefix inside", []string{"2001:db8::/32"}, "2001:db8:1::5", true},
		{"ipv6 prefix outside", []string{"2001:db8::/32"}, "2001:db9::5", false},
		{"bracketed ipv6", []string{"[::1]"}, "::1", true},
		{"bracketed ipv6 prefix", []string{"[2001:db8::]/32"}, "2001:db8::42", true},
		{"link local", []string{"fe80::1"}, "fe80::1", true},
		{"zoned peer matches unzoned entry", []string{"fe80::/10"}, "fe80::1%eth0", true},
		{"zoned peer exact", []string{"fe80::1"}, "fe80::1%eth0", true},

		// A dual-stack listener reports IPv4 clients as mapped addresses.
		{"mapped peer, ipv4 exact", []string{"10.0.0.1"}, "::ffff:10.0.0.1", true},
		{"mapped peer, ipv4 prefix", []string{"10.0.0.0/8"}, "::ffff:10.20.30.40", true},
		{"mapped peer, ipv4 prefix outside", []string{"10.0.0.0/8"}, "::ffff:11.0.0.1", false},
		{"ipv4 peer, mapped exact", []string{"::ffff:10.0.0.1"}, "10.0.0.1", true},
		{"ipv4 peer, mapped prefix", []string{"::ffff:10.0.0.0/104"}, "10.1.2.3", true},
		{"ipv4 peer, mapped prefix outside", []string{"::ffff:10.0.0.0/104"}, "11.1.2.3", false},
		{"ipv4 peer, bracketed mapped", []string{"[::ffff:10.0.0.1]"}, "10.0.0.1", true},
		{"mapped peer, mapped entry", []string{"::ffff:10.0.0.0/104"}, "::ffff:10.0.0.7", true},
		{"ipv4 peer, all mapped space", []string{"::ffff:0.0.0.0/96"}, "192.0.2.1", true},

		// Families never cross except through the mapping.
		{"ipv4 peer, ipv6 loopback", []string{"::1"}, "127.0.0.1", false},
		{"ipv4 peer, unrelated ipv6 prefix", []string{"2001:db8::/32"}, "10.0.0.1", false},
		{"ipv4 peer, ipv4-compatible ipv6", []string{"::10.0.0.1"}, "10.0.0.1", false},
		{"ipv6 peer, ipv4 entry", []string{"10.0.0.0/8"}, "::a00:1", false},
		{"ipv6 peer, ipv4 /1", []string{"0.0.0.0/1"}, "::1", false},
		{"ipv6 loopback, ipv4 loopback", []string{"127.0.0.1"}, "::1", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := New(tt.entries, false)
			require.NoError(t, err)
			peer := netip.MustParseAddr(tt.peer)
			require.Equal(t, tt.want, l.Allows(peer))

			// The default only governs empty lists.
			d, err := New(tt.entries, true)
			require.NoError(t, err)
			require.Equal(t, tt.want, d.Allows(peer))
		})
	}
}

func TestAllowsEmptyList(t *testing.T) {
	peers := []string{"10.0.0.1", "::1", "::ffff:10.0.0.1", "fe80::1%eth0"}
	tests := []struct {
		name        string
		entries     []string
		defaultDeny bool
		want        bool
	}{
		{"nil entries admit all", nil, false, true},
		{"empty entries admit all", []string{}, false, true},
		{"nil entries default deny", nil, true, false},
		{"empty entries default deny", []string{}, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := New(tt.entries, tt.defaultDeny)
			require.NoError(t, err)
			require.Equal(t, 0, l.Len())
			require.Equal(t, tt.defaultDeny, l.DefaultDeny())
			require.Empty(t, l.Entries())
			for _, p := range peers {
				require.Equal(t, tt.want, l.Allows(netip.MustParseAddr(p)), p)
			}
			require.Equal(t, tt.want, l.Allows(netip.Addr{}), "invalid address")
		})
	}
}

func TestDefaultDenyWithEntries(t *testing.T) {
	l, err := New([]string{"10.0.0.0/8"}, true)
	require.NoError(t, err)
	require.True(t, l.DefaultDeny())
	require.True(t, l.Allows(netip.MustParseAddr("10.0.0.1")))
	require.False(t, l.Allows(netip.MustParseAddr("192.0.2.1")))
}

func TestInvalidAddrNeverMatches(t *testing.T) {
	l, err := New([]string{"10.0.0.0/8", "::/1"}, false)
	require.NoError(t, err)
	require.False(t, l.Allows(netip.Addr{}))
}

func TestNilList(t *testing.T) {
	var l *List
	require.True(t, l.Allows(netip.MustParseAddr("10.0.0.1")))
	require.True(t, l.AllowsAddr(&net.TCPAddr{IP: net.ParseIP("::1")}))
	require.False(t, l.DefaultDeny())
	require.Equal(t, 0, l.Len())
	require.Empty(t, l.Entries())
}

func TestZeroList(t *testing.T) {
	var l List
	require.True(t, l.Allows(netip.MustParseAddr("10.0.0.1")))
	require.False(t, l.DefaultDeny())
	require.Equal(t, 0, l.Len())
}

func TestAllowsAddr(t *testing.T) {
	restricted, err := New([]string{"10.0.0.0/8", "2001:db8::/32"}, false)
	require.NoError(t, err)
	denyAll, err := New(nil, true)
	require.NoError(t, err)
	open, err := New(nil, false)
	require.NoError(t, err)

	var nilList *List
	// The server checks every peer with AllowsAddr; each row is the rule
	// for one kind of peer under each kind of list. A nil list, the
	// server's default, admits everyone.
	tests := []struct {
		name                   string
		addr                   net.Addr
		restricted, deny, open bool
	}{
		{"tcp ipv4 allowed", &net.TCPAddr{IP: net.IPv4(10, 1, 2, 3), Port: 40000}, true, false, true},
		{"tcp ipv4 4-byte form", &net.TCPAddr{IP: net.IP{10, 1, 2, 3}.To4()}, true, false, true},
		{"tcp ipv4 denied", &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1)}, false, false, true},
		{"tcp mapped from dual stack", &net.TCPAddr{IP: net.ParseIP("::ffff:10.0.0.9")}, true, false, true},
		{"tcp ipv6 allowed", &net.TCPAddr{IP: net.ParseIP("2001:db8::1")}, true, false, true},
		{"tcp ipv6 denied", &net.TCPAddr{IP: net.ParseIP("2001:db9::1")}, false, false, true},
		{"tcp ipv6 zoned", &net.TCPAddr{IP: net.ParseIP("fe80::1"), Zone: "eth0"}, false, false, true},
		{"tcp malformed ip", &net.TCPAddr{IP: net.IP{1, 2, 3}}, false, false, true},
		{"tcp nil ip", &net.TCPAddr{}, false, false, true},
		{"udp ipv4 allowed", &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1)}, true, false, true},
		{"unix always allowed", &net.UnixAddr{Name: "/tmp/sock", Net: "unix"}, true, true, true},
		{"unix unnamed peer", &net.UnixAddr{Net: "unix"}, true, true, true},
		{"typed nil tcp", (*net.TCPAddr)(nil), false, false, true},
		{"typed nil udp", (*net.UDPAddr)(nil), false, false, true},
		{"nil", nil, false, false, true},
		{"ip addr unsupported", &net.IPAddr{IP: net.IPv4(10, 0, 0, 1)}, false, false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.restricted, restricted.AllowsAddr(tt.addr), "restricted")
			require.Equal(t, tt.deny, denyAll.AllowsAddr(tt.addr), "deny all")
			require.Equal(t, tt.open, open.AllowsAddr(tt.addr), "open")
			require.True(t, nilList.AllowsAddr(tt.addr), "nil")
		})
	}
}

func TestAllowsAddrLinkLocalZone(t *testing.T) {
	l, err := New([]string{"fe80::/10"}, false)
	require.NoError(t, err)
	require.True(t, l.AllowsAddr(&net.TCPAddr{IP: net.ParseIP("fe80::1"), Zone: "eth0"}))
}

func TestEntriesOrderAndDuplicates(t *testing.T) {
	in := []string{"::1", "10.0.0.1/8", "[fe80::]/10", "10.0.0.1", "::1"}
	l, err := New(in, false)
	require.NoError(t, err)
	require.Equal(t, []string{"::1", "10.0.0.0/8", "fe80::/10", "10.0.0.1", "::1"}, l.Entries())
	require.Equal(t, len(in), l.Len())
}

func TestImmutable(t *testing.T) {
	in := []string{"10.0.0.1", "::1"}
	l, err := New(in, false)
	require.NoError(t, err)

	in[0] = "192.0.2.1"
	require.True(t, l.Allows(netip.MustParseAddr("10.0.0.1")))
	require.False(t, l.Allows(netip.MustParseAddr("192.0.2.1")))

	got := l.Entries()
	got[0] = "changed"
	require.Equal(t, []string{"10.0.0.1", "::1"}, l.Entries())
}

func TestConcurrentUse(t *testing.T) {
	a, err := New([]string{"10.0.0.0/8", "2001:db8::/32"}, false)
	require.NoError(t, err)
	b, err := New([]string{"192.168.0.0/16"}, true)
	require.NoError(t, err)
	lists := []*List{a, b}

	// The server swaps whole lists through an atomic pointer while accept
	// loops read them; -race checks that nothing in a List is written
	// after New.
	var cur atomic.Pointer[List]
	cur.Store(a)

	peers := []netip.Addr{
		netip.MustParseAddr("10.0.0.1"),
		netip.MustParseAddr("::ffff:192.168.1.1"),
		netip.MustParseAddr("2001:db8::1"),
		netip.MustParseAddr("fe80::1%eth0"),
	}
	tcp := &net.TCPAddr{IP: net.ParseIP("10.0.0.1")}

	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() {
			for j := range 2000 {
				if i == 0 && j%10 == 0 {
					cur.Store(lists[(j/10)%len(lists)])
				}
				l := cur.Load()
				for _, p := range peers {
					_ = l.Allows(p)
				}
				_ = l.AllowsAddr(tcp)
				_ = l.Entries()
				_ = l.Len()
				_ = l.DefaultDeny()
			}
		})
	}
	wg.Wait()

	// Sharing one List between goroutines must not change its answers.
	require.True(t, a.Allows(peers[0]))
	require.False(t, a.Allows(peers[1]))
	require.True(t, b.Allows(peers[1]))
	require.Equal(t, []string{"10.0.0.0/8", "2001:db8::/32"}, a.Entries())
}

func TestErrorsAsThroughWrapping(t *testing.T) {
	_, err := New([]string{"abc"}, false)
	wrapped := fmt.Errorf("acl command: %w", err)
	var bad *BadSpecError
	require.True(t, errors.As(wrapped, &bad))
	require.Equal(t, "abc", bad.Entry)
}

func BenchmarkAllows(b *testing.B) {
	l, err := New([]string{
		"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16",
		"2001:db8::/32", "fe80::/10", "::1",
	}, false)
	require.NoError(b, err)
	peer := netip.MustParseAddr("::ffff:203.0.113.9")
	for b.Loop() {
		l.Allows(peer)
	}
}

func TestWideIPv6EntryCoversMappedSpace(t *testing.T) {
	// ::/8 contains ::ffff:0:0/96, so a dual-stack listener would see an
	// IPv4 client inside it; an IPv4 listener must decide the same way.
	l, err := New([]string{"::/8"}, false)
	require.NoError(t, err)
	require.True(t, l.Allows(netip.MustParseAddr("::ffff:192.0.2.1")))
	require.True(t, l.Allows(netip.MustParseAddr("192.0.2.1")))
	require.False(t, l.Allows(netip.MustParseAddr("2001:db8::1")))
}
