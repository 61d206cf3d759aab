package control_test

import (
	"context"
	"errors"
	"io"
	"net"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/control"
)

// ioTimeout guards every blocking read in these tests so that a bug shows
// up as a failure instead of a hang; nothing waits for it to pass.
const ioTimeout = 20 * time.Second

// fakeHandler records what the Server asks of it and answers as told.
type fakeHandler struct {
	mu        sync.Mutex
	status    control.StatusInfo
	acl       []string
	aclSet    int
	mirroring bool
	completed bool
	speed     uint64
	mirrorReq *control.MirrorRequest
	mirrorErr error
	// If set, Mirror signals entered and waits for release or ctx.
	mirrorEntered chan struct{}
	mirrorRelease chan struct{}
	// upstreams is a proxy's list; nil makes the handler a server.
	upstreams []string
}

func (h *fakeHandler) SetUpstreams(us []string) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.upstreams == nil {
		return control.ErrNotProxy
	}
	h.upstreams = us
	return nil
}

func (h *fakeHandler) Status() control.StatusInfo {
	h.mu.Lock()
	defer h.mu.Unlock()
	st := h.status
	st.IsMirroring = h.mirroring
	return st
}

func (h *fakeHandler) SetACL(entries []string) error {
	if _, err := acl.New(entries, false); err != nil {
		return err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	h.acl = entries
	h.aclSet++
	return nil
}

func (h *fakeHandler) Mirror(ctx context.Context, req control.MirrorRequest) error {
	h.mu.Lock()
	h.mirrorReq = &req
	entered, release, err := h.mirrorEntered, h.mirrorRelease, h.mirrorErr
	h.mu.Unlock()
	if entered != nil {
		close(entered)
		select {
		case <-release:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return err
}

func (h *fakeHandler) Break(context.Context) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	switch {
	case h.completed:
		return control.ErrMirrorCompleted
	case !h.mirroring:
		return control.ErrNotMirroring
	}
	h.mirroring = false
	return nil
}

func (h *fakeHandler) WaitMirror(context.Context) (string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.completed {
		return "mirror completed", nil
	}
	return "", control.ErrMirrorStopped
}

func (h *fakeHandler) SetMirrorSpeed(n uint64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.mirroring {
		return control.ErrNotMirroring
	}
	h.speed = n
	return nil
}

// startServer serves h on a fresh socket until the test ends and returns
// the socket's path.
func startServer(t *testing.T, srv *control.Server) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ctl.sock")
	l, err := control.Listen(path)
	require.NoError(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), ioTimeout)
		defer cancel()
		require.NoError(t, srv.Shutdown(ctx))
		require.ErrorIs(t, <-served, control.ErrServerClosed)
	})
	return path
}

// converse sends raw bytes, ends its side of the connection and returns
// everything the server sent before closing.
func converse(t *testing.T, path string, raw string) string {
	t.Helper()
	c, err := net.Dial("unix", path)
	require.NoError(t, err)
	defer c.Close()
	require.NoError(t, c.SetDeadline(time.Now().Add(ioTimeout)))
	_, err = io.WriteString(c, raw)
	require.NoError(t, err)
	require.NoError(t, c.(*net.UnixConn).CloseWrite())
	out, err := io.ReadAll(c)
	require.NoError(t, err)
	return string(out)
}

// readAll reads what c sends until it closes, failing on a timeout. A
// Unix socket closed with our unread bytes still queued reports
// ECONNRESET after its last data instead of EOF; both mean "closed".
func readAll(t *testing.T, c net.Conn) string {
	t.Helper()
	require.NoError(t, c.SetReadDeadline(time.Now().Add(ioTimeout)))
	out, err := io.ReadAll(c)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		require.NoError(t, err)
	}
	return string(out)
}
