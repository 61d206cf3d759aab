package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/coreos/go-systemd/v22/activation"

	"github.com/flexnbd/flexnbd/nbd"
)

// listenFlags choose where serve, listen and proxy take clients: a TCP
// address and port, a Unix socket, or a socket systemd passed.
type listenFlags struct {
	Addr string `short:"l" help:"Address to listen on; a path starting with / is a Unix socket, as --unix."`
	// A pointer, so that --port 0 (any free port) is told from no --port.
	Port     *uint16 `short:"p" help:"TCP port to listen on; 0 takes a free one (see --print-uri)."`
	Unix     string  `name:"unix" placeholder:"PATH" help:"Listen on this Unix socket instead of --addr/--port."`
	PrintURI bool    `name:"print-uri" help:"Once ready, print the NBD URI clients should use on standard output, one line."`
}

// listen opens the listener the flags ask for. A socket passed by systemd
// (LISTEN_FDS, LISTEN_PID) stands in for the flags, which must then be
// absent: a unit that names both would leave one of them unused.
func (f *listenFlags) listen() (net.Listener, error) {
	activated, err := activation.Listeners()
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	if len(activated) > 0 {
		if f.Addr != "" || f.Port != nil || f.Unix != "" {
			closeAll(activated)
			return nil, errors.New("socket activation: --addr, --port and --unix must not be given with a passed socket")
		}
		if len(activated) != 1 || activated[0] == nil {
			closeAll(activated)
			return nil, fmt.Errorf("socket activation: %d descriptors passed, expected one listening stream socket", len(activated))
		}
		return activated[0], nil
	}
	path := f.Unix
	switch {
	case f.Unix != "" && (f.Addr != "" || f.Port != nil):
		return nil, errors.New("--unix does not go with --addr or --port")
	case f.Unix == "" && strings.HasPrefix(f.Addr, "/"):
		// The C tools pass port 0 along with a socket path.
		if f.Port != nil && *f.Port != 0 {
			return nil, errors.New("--port does not go with a Unix socket path")
		}
		path = f.Addr
	case f.Unix == "" && f.Addr == "":
		return nil, errors.New("--addr and --port, or --unix, are required (or a socket passed by systemd)")
	case f.Unix == "" && f.Port == nil:
		return nil, errors.New("--port is required with a TCP address")
	}
	if path != "" {
		return listenUnix(path)
	}
	return net.Listen("tcp", net.JoinHostPort(f.Addr, strconv.Itoa(int(*f.Port))))
}

// listenUnix listens on path, replacing a socket file that a killed
// server left behind: one that nobody answers on. A live one is an error.
func listenUnix(path string) (net.Listener, error) {
	l, err := net.Listen("unix", path)
	if err == nil || !errors.Is(err, syscall.EADDRINUSE) {
		return l, err
	}
	c, dialErr := net.Dial("unix", path)
	if dialErr == nil {
		c.Close()
		return nil, err
	}
	if !errors.Is(dialErr, syscall.ECONNREFUSED) {
		return nil, err
	}
	if fi, statErr := os.Lstat(path); statErr != nil || fi.Mode()&os.ModeSocket == 0 {
		return nil, err
	}
	if rmErr := os.Remove(path); rmErr != nil {
		return nil, err
	}
	return net.Listen("unix", path)
}

func closeAll(ls []net.Listener) {
	for _, l := range ls {
		if l != nil {
			l.Close()
		}
	}
}

// uri is the NBD URI a client uses to reach exportName on l. An address
// that listens on every interface is named by this host's name, since
// 0.0.0.0 or :: is nowhere a client can dial.
func uri(l net.Listener, exportName string) string {
	u := nbd.URI{Network: l.Addr().Network(), Address: l.Addr().String(), ExportName: exportName}
	if tcp, ok := l.Addr().(*net.TCPAddr); ok {
		u.Network = "tcp"
		host := tcp.IP.String()
		if tcp.Zone != "" {
			host += "%" + tcp.Zone
		}
		if tcp.IP.IsUnspecified() {
			if h, err := os.Hostname(); err == nil {
				host = h
			}
		}
		u.Address = net.JoinHostPort(host, strconv.Itoa(tcp.Port))
	}
	// Clients do not share the server's working directory; an abstract
	// socket ("@name") has no directory at all.
	if u.Network == "unix" && !filepath.IsAbs(u.Address) && !strings.HasPrefix(u.Address, "@") {
		if abs, err := filepath.Abs(u.Address); err == nil {
			u.Address = abs
		}
	}
	return u.String()
}

// printURI prints the URI if --print-uri asked for it.
func (f *listenFlags) printURI(l net.Listener, exportName string) {
	if f.PrintURI {
		fmt.Fprintln(os.Stdout, uri(l, exportName))
	}
}
