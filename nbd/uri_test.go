package nbd

import (
	"errors"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

var uriCases = []struct {
	name string
	in   string
	want URI
}{
	{"host only", "nbd://example.com", URI{"tcp", "example.com:10809", ""}},
	{"host slash", "nbd://example.com/", URI{"tcp", "example.com:10809", ""}},
	{"export", "nbd://example.com/disk", URI{"tcp", "example.com:10809", "disk"}},
	{"port", "nbd://127.0.0.1:10810/disk", URI{"tcp", "127.0.0.1:10810", "disk"}},
	{"leading slash kept", "nbd://example.com//disk", URI{"tcp", "example.com:10809", "/disk"}},
	{"percent decoded", "nbd://example.com/hello%20world", URI{"tcp", "example.com:10809", "hello world"}},
	{"ipv6", "nbd://[::1]:10811/x", URI{"tcp", "[::1]:10811", "x"}},
	{"ipv6 default port", "nbd://[2001:db8::1]", URI{"tcp", "[2001:db8::1]:10809", ""}},
	{"ipv6 zone", "nbd://[fe80::1%25eth0]:1/", URI{"tcp", "[fe80::1%eth0]:1", ""}},
	{"scheme case", "NBD://h/e", URI{"tcp", "h:10809", "e"}},
	{"experimental parameter", "nbd://h/e?x-foo=1", URI{"tcp", "h:10809", "e"}},
	{"unix", "nbd+unix:///disk?socket=/run/nbd.sock", URI{"unix", "/run/nbd.sock", "disk"}},
	{"unix default export", "nbd+unix:///?socket=nbd.sock", URI{"unix", "nbd.sock", ""}},
	{"unix no path", "nbd+unix://?socket=%2Frun%2Fa%20b", URI{"unix", "/run/a b", ""}},
	{"unix abstract", "nbd+unix:///?socket=%00/abstract", URI{"unix", "\x00/abstract", ""}},
	{"slashes and query chars in name", "nbd://h/a/b%3Fc%23d", URI{"tcp", "h:10809", "a/b?c#d"}},
	// libnbd and qemu read a query as a URI, not a form: "+" is a plus.
	{"plus in socket", "nbd+unix:///?socket=/tmp/c++.sock", URI{"unix", "/tmp/c++.sock", ""}},
	{"encoded plus and space in socket", "nbd+unix:///?socket=/tmp/a%2Bb%20c", URI{"unix", "/tmp/a+b c", ""}},
	{"plus in name", "nbd://h/a+b", URI{"tcp", "h:10809", "a+b"}},
	{"equals in socket", "nbd+unix:///?x-a=&socket=/tmp/a=b", URI{"unix", "/tmp/a=b", ""}},
	{"ipv4-mapped ipv6", "nbd://[::ffff:1.2.3.4]/", URI{"tcp", "[::ffff:1.2.3.4]:10809", ""}},
}

func TestParseURI(t *testing.T) {
	for _, tt := range uriCases {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseURI(tt.in)
			require.NoError(t, err)
			require.Equal(t, tt.want, got)
			back, err := ParseURI(got.String())
			require.NoError(t, err, "String gave %q", got.String())
			require.Equal(t, got, back)
		})
	}
}

func TestParseURIRefuses(t *testing.T) {
	for _, tt := range []struct {
		name, in, msg string
	}{
		{"tls", "nbds://h/e", "TLS"},
		{"tls unix", "nbds+unix:///e?socket=s", "TLS"},
		{"tls parameter", "nbd://h/e?tls-type=x509", "TLS"},
		{"user", "nbd://alice@h/e", "user"},
		{"vsock", "nbd+vsock://1/e", "unsupported scheme"},
		{"other scheme", "http://h/e", "unsupported scheme"},
		{"no scheme", "h:10809", "scheme"},
		{"bare word", "disk", "no scheme"},
		{"opaque", "nbd:h/e", "nbd://"},
		{"no host", "nbd:///e", "no host"},
		{"port zero", "nbd://h:0/e", "bad port"},
		{"port too big", "nbd://h:65536/e", "bad port"},
		{"empty port", "nbd://h:/e", "empty port"},
		{"ipv4 in brackets", "nbd://[127.0.0.1]/e", "IP-literal"},
		{"ipv6 without brackets", "nbd://0::1/e", "brackets"},
		{"zone not an interface name", "nbd://[::%25\x86]/e", "interface name"},
		{"zone with a space", "nbd://[fe80::1%25a%20b]/e", "interface name"},
		{"unknown parameter", "nbd://h/e?size=1", "unknown query parameter"},
		{"socket on tcp", "nbd://h/e?socket=/s", "nbd+unix"},
		{"unix without socket", "nbd+unix:///e", "socket=PATH"},
		{"unix two sockets", "nbd+unix:///e?socket=a&socket=b", "socket=PATH"},
		{"unix with host", "nbd+unix://h/e?socket=s", "no host"},
		{"nul in name", "nbd://h/a%00b", "NUL"},
		{"fragment", "nbd://h/e#f", "fragment"},
		{"long name", "nbd://h/" + strings.Repeat("a", MaxStringLen+1), "over"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseURI(tt.in)
			require.ErrorContains(t, err, tt.msg)
		})
	}
	_, err := ParseURI("nbds://h/")
	require.True(t, errors.Is(err, ErrURITLS))
}

func TestURIString(t *testing.T) {
	for _, tt := range []struct {
		in   URI
		want string
	}{
		{URI{"tcp", "127.0.0.1:10809", ""}, "nbd://127.0.0.1:10809/"},
		{URI{"tcp", "[::1]:7", "a b"}, "nbd://[::1]:7/a%20b"},
		{URI{"unix", "/run/flexnbd/vm 1.sock", "vm1"}, "nbd+unix:///vm1?socket=%2Frun%2Fflexnbd%2Fvm%201.sock"},
		{URI{"unix", "/tmp/c++ & d=e.sock", ""}, "nbd+unix:///?socket=%2Ftmp%2Fc%2B%2B%20%26%20d%3De.sock"},
		{URI{"unix", "s", "/x"}, "nbd+unix:////x?socket=s"},
	} {
		require.Equal(t, tt.want, tt.in.String())
		back, err := ParseURI(tt.want)
		require.NoError(t, err)
		require.Equal(t, tt.in, back)
	}
}

// FuzzParseURI checks that no input panics the parser and that every URI
// it accepts formats to one that parses back to the same place.
func FuzzParseURI(f *testing.F) {
	for _, tt := range uriCases {
		f.Add(tt.in)
	}
	f.Add("nbds://h/")
	f.Add("nbd+unix://h/e?socket=s")
	f.Fuzz(func(t *testing.T, s string) {
		u, err := ParseURI(s)
		if err != nil {
			return
		}
		require.Contains(t, []string{"tcp", "unix"}, u.Network)
		require.NotEmpty(t, u.Address)
		back, err := ParseURI(u.String())
		require.NoError(t, err, "%q formatted as %q", s, u.String())
		require.Equal(t, u, back, "%q formatted as %q", s, u.String())
	})
}
