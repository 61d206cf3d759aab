package control

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"
)

// maxSocketPath is the longest path a Unix socket address holds on Linux
// (sun_path is 108 bytes with its terminating NUL).
const maxSocketPath = 107

// probeTimeout bounds the connection attempt that tells a live socket
// from a stale one.
const probeTimeout = 2 * time.Second

// ErrSocketInUse reports a control socket path on which a running process
// still accepts connections.
var ErrSocketInUse = errors.New("in use by a running process")

// Listen creates the control socket at path and returns a listener whose
// Close removes the file again (unless another process has replaced it
// meanwhile). The socket appears under its name already listening and
// already with mode 0600, so a script that waits for the file can connect
// at once and nobody else can. A socket file left behind by a process
// that died is replaced; one on which a process still listens is an
// ErrSocketInUse error, and any other kind of file an error too.
func Listen(path string) (net.Listener, error) {
	stale, err := inspectPath(path)
	if err != nil {
		return nil, err
	}
	// The socket is bound inside a private directory next to path and
	// moved into place, so nobody can reach it before its mode is set,
	// and the name never points at a socket that does not listen yet.
	tmpDir, err := os.MkdirTemp(filepath.Dir(path), ".flexnbd")
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, "s")
	if len(tmp) > maxSocketPath {
		// Too long for the detour; bind in place, with a moment in
		// which the mode is still the umask's.
		if stale {
			if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("control socket %s: remove stale socket: %w", path, err)
			}
		}
		tmp = path
	}
	ul, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	fail := func(err error) (net.Listener, error) {
		ul.Close()
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := os.Chmod(tmp, 0o600); err != nil {
		return fail(err)
	}
	if tmp != path {
		if err := os.Rename(tmp, path); err != nil {
			return fail(err)
		}
	}
	ul.SetUnlinkOnClose(false)
	fi, err := os.Lstat(path)
	if err != nil {
		return fail(err)
	}
	return &listener{UnixListener: ul, path: path, file: fi}, nil
}

// inspectPath reports whether path holds a stale socket that may be
// replaced, or an error if it holds anything that must be left alone.
func inspectPath(path string) (stale bool, err error) {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("control socket %s: %w", path, err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return false, fmt.Errorf("control socket %s: exists and is not a socket", path)
	}
	c, err := net.DialTimeout("unix", path, probeTimeout)
	if err == nil {
		c.Close()
		return false, fmt.Errorf("control socket %s: %w", path, ErrSocketInUse)
	}
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, fs.ErrNotExist) {
		return true, nil
	}
	// A full backlog, a permission problem: not provably stale.
	return false, fmt.Errorf("control socket %s: cannot tell whether it is in use: %w", path, err)
}

// listener removes its socket file on Close.
type listener struct {
	*net.UnixListener
	path string
	file os.FileInfo // the socket file as created, to recognise it later
	once sync.Once
}

// Addr reports the socket's final path rather than the one it was bound
// at.
func (l *listener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

// Close removes the socket file if it is still the one Listen created, then
// stops listening: the name goes first, so it never leads to a socket
// that no longer answers, and the file is gone by the time Accept fails.
func (l *listener) Close() error {
	var err error
	l.once.Do(func() {
		if cur, serr := os.Lstat(l.path); serr == nil && os.SameFile(cur, l.file) {
			err = os.Remove(l.path)
		}
	})
	if cerr := l.UnixListener.Close(); err == nil {
		err = cerr
	}
	return err
}
