package acl

import (
	"net"
	"net/netip"
	"strings"
)

// BadSpecError reports an ACL entry that could not be parsed. Its Error text
// is exactly "bad spec: " followed by the entry, as the control socket
// replies it.
type BadSpecError struct {
	// Entry is the offending entry, exactly as supplied.
	Entry string
}

// Error returns "bad spec: " followed by the entry.
func (e *BadSpecError) Error() string {
	return "bad spec: " + e.Entry
}

// List is a parsed access control list. The zero value and a nil *List
// admit every peer. A List is immutable once built by New and is safe for
// concurrent use.
type List struct {
	// Kept apart by family so an IPv4 peer is compared with each list in
	// the form that list understands, without per-call conversions.
	v4          []netip.Prefix
	v6          []netip.Prefix
	entries     []string
	defaultDeny bool
}

// New parses entries, in order, into a List. It returns a *BadSpecError
// naming the first entry that is not a valid spec, and no List. With
// defaultDeny, an empty list admits nobody instead of everybody; it has no
// effect on a non-empty list.
func New(entries []string, defaultDeny bool) (*List, error) {
	l := &List{
		entries:     make([]string, 0, len(entries)),
		defaultDeny: defaultDeny,
	}
	for _, e := range entries {
		p, err := parseEntry(e)
		if err != nil {
			return nil, err
		}
		if p.Addr().Is4() {
			l.v4 = append(l.v4, p)
		} else {
			l.v6 = append(l.v6, p)
		}
		l.entries = append(l.entries, format(p))
	}
	return l, nil
}

// parseEntry returns the masked prefix an entry denotes.
func parseEntry(entry string) (netip.Prefix, error) {
	bad := &BadSpecError{Entry: entry}
	s := entry
	bracketed := false
	if strings.HasPrefix(s, "[") {
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return netip.Prefix{}, bad
		}
		inner, rest := s[1:end], s[end+1:]
		// The brackets enclose an address only; a length goes after them.
		if strings.Contains(inner, "/") || (rest != "" && rest[0] != '/') {
			return netip.Prefix{}, bad
		}
		// Without the brackets the entry is in a form ParsePrefix or
		// ParseAddr accept; the IPv6-only rule is enforced below.
		bracketed = true
		s = inner + rest
	}

	var p netip.Prefix
	if strings.Contains(s, "/") {
		var err error
		// ParsePrefix rejects zones, signs, leading zeros and lengths past
		// the family's bit count.
		if p, err = netip.ParsePrefix(s); err != nil {
			return netip.Prefix{}, bad
		}
		if p.Bits() == 0 {
			return netip.Prefix{}, bad
		}
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, bad
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if bracketed && !p.Addr().Is6() {
		return netip.Prefix{}, bad
	}
	return p.Masked(), nil
}

// format renders p so that parsing the result gives p back; host
// prefixes are shown as bare addresses, as an operator would write them.
func format(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

// Allows reports whether a peer at addr may connect. A nil or empty List
// admits every address unless built with default deny; a non-empty List
// admits only addresses that some entry contains, with IPv4-mapped IPv6
// addresses treated as the IPv4 addresses they carry (see the package
// documentation). Any zone on addr is ignored. An invalid addr matches no
// entry.
func (l *List) Allows(addr netip.Addr) bool {
	if l == nil {
		return true
	}
	if len(l.entries) == 0 {
		return !l.defaultDeny
	}
	// Prefix.Contains never matches a zoned address.
	addr = addr.WithZone("")
	if addr.Is4() || addr.Is4In6() {
		v4 := addr.Unmap()
		for _, p := range l.v4 {
			if p.Contains(v4) {
				return true
			}
		}
		if len(l.v6) == 0 {
			return false
		}
		addr = netip.AddrFrom16(v4.As16())
	}
	if !addr.Is6() {
		return false
	}
	for _, p := range l.v6 {
		if p.Contains(addr) {
			return true
		}
	}
	return false
}

// AllowsAddr reports whether a peer with the given network address may
// connect; it is the check the server applies to every connection.
// Unix-socket peers are local and always allowed. TCP and UDP peers are
// checked as by Allows. Any other address type, and a nil one, is treated
// as an unknown address: admitted only by a list that admits everyone.
func (l *List) AllowsAddr(a net.Addr) bool {
	switch a := a.(type) {
	case *net.UnixAddr:
		return true
	case *net.TCPAddr:
		if a != nil {
			return l.Allows(addrFromIP(a.IP))
		}
	case *net.UDPAddr:
		if a != nil {
			return l.Allows(addrFromIP(a.IP))
		}
	}
	return l.Allows(netip.Addr{})
}

// addrFromIP converts ip, yielding the invalid Addr for a malformed slice.
func addrFromIP(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a
}

// Entries returns the list's entries in their original order, normalised:
// brackets dropped, host bits masked off and full-length prefixes written
// as bare addresses. Passing the result back to New yields an equal List.
// The returned slice is the caller's to keep or modify.
func (l *List) Entries() []string {
	if l == nil {
		return []string{}
	}
	out := make([]string, len(l.entries))
	copy(out, l.entries)
	return out
}

// DefaultDeny reports whether an empty list denies every peer.
func (l *List) DefaultDeny() bool {
	return l != nil && l.defaultDeny
}

// Len returns the number of entries in the list.
func (l *List) Len() int {
	if l == nil {
		return 0
	}
	return len(l.entries)
}
