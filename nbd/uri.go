package nbd

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
)

// DefaultPort is the port IANA assigned to NBD, which a URI without one
// means.
const DefaultPort = 10809

// URI is where an export is: the network and address to dial and the name
// to ask for, as an NBD URI (doc/uri.md of the NetworkBlockDevice/nbd
// project) gives them.
type URI struct {
	// Network is "tcp" or "unix".
	Network string
	// Address is host:port for tcp (an IPv6 host without brackets'
	// escaping: net.JoinHostPort form) or the socket's path for unix.
	Address string
	// ExportName is the URI's path without its first slash,
	// percent-decoded; empty for the default export.
	ExportName string
}

// ErrURITLS refuses the schemes that demand TLS, which flexnbd does not
// speak: a client must fail rather than connect in clear.
var ErrURITLS = errors.New("nbd: URI: TLS is not supported (nbds schemes)")

// ParseURI parses an nbd:// or nbd+unix:// URI. It refuses what it
// cannot honour rather than ignore it: TLS schemes and parameters, user
// information, a host on a Unix socket URI, unknown query parameters
// (those starting with "x-" excepted, as the URI specification asks),
// and export names the protocol cannot carry.
func ParseURI(s string) (URI, error) {
	u, err := url.Parse(s)
	if err != nil {
		return URI{}, fmt.Errorf("nbd: URI: %w", err)
	}
	var out URI
	switch strings.ToLower(u.Scheme) {
	case "nbd":
		out.Network = "tcp"
	case "nbd+unix":
		out.Network = "unix"
	case "nbds", "nbds+unix", "nbds+vsock":
		return URI{}, ErrURITLS
	case "":
		return URI{}, fmt.Errorf("nbd: URI %q: no scheme (nbd:// or nbd+unix://)", s)
	default:
		return URI{}, fmt.Errorf("nbd: URI: unsupported scheme %q (nbd or nbd+unix)", u.Scheme)
	}
	if u.Opaque != "" {
		return URI{}, fmt.Errorf("nbd: URI %q: expected %s://", s, u.Scheme)
	}
	if u.User != nil {
		return URI{}, errors.New("nbd: URI: user information is for TLS, which is not supported")
	}
	if u.Fragment != "" || strings.Contains(s, "#") {
		return URI{}, errors.New("nbd: URI: a fragment has no meaning here")
	}
	if u.Path != "" && !strings.HasPrefix(u.Path, "/") {
		return URI{}, fmt.Errorf("nbd: URI %q: the export name must follow a slash", s)
	}
	out.ExportName = strings.TrimPrefix(u.Path, "/")
	if strings.IndexByte(out.ExportName, 0) >= 0 {
		return URI{}, errors.New("nbd: URI: NUL in the export name")
	}
	if len(out.ExportName) > MaxStringLen {
		return URI{}, fmt.Errorf("nbd: URI: export name of %d bytes, over %d", len(out.ExportName), MaxStringLen)
	}
	q, err := parseQuery(u.RawQuery)
	if err != nil {
		return URI{}, fmt.Errorf("nbd: URI: query: %w", err)
	}
	socket, hasSocket := q["socket"]
	for k := range q {
		switch {
		case k == "socket", strings.HasPrefix(k, "x-"):
		case strings.HasPrefix(k, "tls-"):
			return URI{}, fmt.Errorf("nbd: URI: %s: TLS is not supported", k)
		default:
			return URI{}, fmt.Errorf("nbd: URI: unknown query parameter %q", k)
		}
	}

	if out.Network == "unix" {
		if u.Host != "" {
			return URI{}, fmt.Errorf("nbd: URI: nbd+unix takes no host (%q): nbd+unix:///export?socket=PATH", u.Host)
		}
		if len(socket) != 1 || socket[0] == "" {
			return URI{}, errors.New("nbd: URI: nbd+unix needs one socket=PATH parameter")
		}
		out.Address = socket[0]
		return out, nil
	}
	if hasSocket {
		return URI{}, errors.New("nbd: URI: socket= goes with nbd+unix, not nbd")
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		return URI{}, fmt.Errorf("nbd: URI %q: no host", s)
	}
	if port == "" {
		if strings.HasSuffix(u.Host, ":") {
			return URI{}, fmt.Errorf("nbd: URI %q: empty port", s)
		}
		port = strconv.Itoa(DefaultPort)
	} else if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return URI{}, fmt.Errorf("nbd: URI: bad port %q", port)
	}
	if !strings.HasPrefix(u.Host, "[") && strings.Contains(host, ":") {
		return URI{}, fmt.Errorf("nbd: URI %q: an IPv6 address goes in brackets", s)
	}
	if strings.HasPrefix(u.Host, "[") {
		// Brackets hold an IPv6 literal, or nothing the dialer takes.
		// netip keeps ::ffff:1.2.3.4 as the IPv6 address it is written as.
		ip, err := netip.ParseAddr(host)
		if err != nil || !ip.Is6() {
			return URI{}, fmt.Errorf("nbd: URI: %q in brackets is not an IPv6 address", host)
		}
		// A zone names an interface; anything beyond an interface name's
		// usual characters would not survive formatting back to a URI.
		if z := ip.Zone(); strings.TrimLeft(z, zoneChars) != "" {
			return URI{}, fmt.Errorf("nbd: URI: zone %q is not an interface name", z)
		}
	}
	out.Address = net.JoinHostPort(host, port)
	return out, nil
}

// zoneChars are the bytes an IPv6 zone may hold: those of interface names
// that a URI's host carries unescaped.
const zoneChars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~"

// String formats u as a URI that ParseURI reads back to u, with the port
// always explicit.
func (u URI) String() string {
	v := url.URL{Path: "/" + u.ExportName}
	switch u.Network {
	case "unix":
		v.Scheme = "nbd+unix"
		v.RawQuery = "socket=" + escapeQueryValue(u.Address)
		// url.URL writes no "//" without a host unless the path starts
		// with one, and the empty authority is part of the form.
		return v.Scheme + "://" + v.EscapedPath() + "?" + v.RawQuery
	default:
		v.Scheme = "nbd"
		v.Host = u.Address
		return v.String()
	}
}

// parseQuery splits a query on "&" and "=" and percent-decodes its keys
// and values as a URI does, unlike url.ParseQuery, which reads a form:
// libnbd and qemu take "+" for a plus, so socket=/tmp/c++.sock is that
// path.
func parseQuery(raw string) (map[string][]string, error) {
	q := make(map[string][]string)
	for _, part := range strings.Split(raw, "&") {
		if part == "" {
			continue
		}
		k, v, _ := strings.Cut(part, "=")
		key, err := url.PathUnescape(k)
		if err != nil {
			return nil, err
		}
		val, err := url.PathUnescape(v)
		if err != nil {
			return nil, err
		}
		q[key] = append(q[key], val)
	}
	return q, nil
}

// escapeQueryValue percent-encodes all but the unreserved characters, so
// that a space is %20, never the form encoding's "+", and "+", "&" and
// "=" keep their meaning for every reader.
func escapeQueryValue(s string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9',
			c == '-', c == '.', c == '_', c == '~':
			b.WriteByte(c)
		default:
			b.WriteByte('%')
			b.WriteByte(hex[c>>4])
			b.WriteByte(hex[c&15])
		}
	}
	return b.String()
}
