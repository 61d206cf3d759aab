package acl

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

// FuzzNew feeds newline-separated entry lists to New. Every list New
// accepts must survive a trip through Entries unchanged, and every list it
// refuses must be refused with a *BadSpecError naming one of the inputs.
func FuzzNew(f *testing.F) {
	seeds := []string{
		"10.0.0.1",
		"10.0.0.0/8",
		"10.1.2.3/8",
		"::1",
		"fe80::1",
		"2001:db8::/32",
		"[::1]",
		"[2001:db8::]/32",
		"::ffff:10.0.0.0/104",
		"10.0.0.1\n::1\n[fe80::]/10",
		"",
		"10.0.0.1/33",
		"::1/129",
		"/8",
		"10.0.0.0/0",
		"[10.0.0.1]",
		"abc",
		"1.2.3.4 ",
		"fe80::1%eth0",
		"[::1/64]",
	}
	for _, s := range seeds {
		f.Add(s, false)
		f.Add(s, true)
	}
	f.Fuzz(func(t *testing.T, joined string, defaultDeny bool) {
		entries := strings.Split(joined, "\n")
		l, err := New(entries, defaultDeny)
		if err != nil {
			require.Nil(t, l)
			bad, ok := err.(*BadSpecError)
			require.True(t, ok, "error %T is not *BadSpecError", err)
			require.Contains(t, entries, bad.Entry)
			require.Equal(t, "bad spec: "+bad.Entry, err.Error())
			return
		}

		got := l.Entries()
		require.Len(t, got, len(entries))
		require.Equal(t, len(entries), l.Len())
		require.Equal(t, defaultDeny, l.DefaultDeny())

		again, err := New(got, defaultDeny)
		require.NoError(t, err)
		require.Equal(t, l, again)
		require.Equal(t, got, again.Entries())

		// Each entry admits its own address, in whichever family a peer
		// might present it.
		for _, e := range got {
			p, err := netip.ParsePrefix(e)
			if err != nil {
				a, aerr := netip.ParseAddr(e)
				require.NoError(t, aerr, "entry %q", e)
				p = netip.PrefixFrom(a, a.BitLen())
			}
			a := p.Addr()
			require.True(t, l.Allows(a), "entry %q", e)
			if a.Is4() || a.Is4In6() {
				require.True(t, l.Allows(a.Unmap()), "entry %q", e)
				require.True(t, l.Allows(netip.AddrFrom16(a.As16())), "entry %q", e)
			}
		}
	})
}
