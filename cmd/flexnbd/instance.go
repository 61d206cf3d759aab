package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/server"
)

// instance is a running serve or listen as its control socket sees it:
// the server and its file, a migration out of it, and for listen the
// destination policy that gives it control at the hand-off.
type instance struct {
	srv  *server.Server
	file *server.File
	path string              // the file, which --unlink removes
	dest *mirror.Destination // nil for serve
	log  zerolog.Logger
	// self is the NBD listener's address, so that a mirror aimed at this
	// very server is refused; set before the control socket starts.
	self net.Addr
	// onReady, if set, runs once the NBD port and the control socket
	// are up.
	onReady func()

	// aclMu orders access list changes, so the list in force is the one
	// whose "updated" was sent last.
	aclMu sync.Mutex

	mu       sync.Mutex // guards the fields below
	mirror   *mirror.Mirror
	finish   mirror.Finish
	starting bool // a mirror command is connecting
	closing  bool
	// handedOff is closed when a migration handed the export over for
	// good (finish exit or unlink): the instance must now exit.
	handedOff chan struct{}
}

var _ control.Handler = (*instance)(nil)

func newInstance(srv *server.Server, file *server.File, path string, dest *mirror.Destination, log zerolog.Logger) *instance {
	return &instance{srv: srv, file: file, path: path, dest: dest, log: log, handedOff: make(chan struct{})}
}

func (h *instance) hasControl() bool { return h.dest == nil || h.dest.HasControl() }

// Status reports the server and any migration out of it.
func (h *instance) Status() control.StatusInfo {
	st := h.srv.Stats()
	info := control.StatusInfo{
		PID:  os.Getpid(),
		Size: h.srv.Size(),
		// A destination admits only its source until it has control.
		ClientsAllowed:      h.hasControl(),
		NumClients:          st.Clients,
		HasControl:          h.hasControl(),
		Uptime:              st.Uptime,
		BytesRead:           st.BytesRead,
		BytesWritten:        st.BytesWritten,
		Requests:            st.Requests,
		Errors:              st.Errors,
		ConnectionsSeen:     st.ConnectionsSeen,
		ConnectionsRejected: st.Rejected,
		Version:             buildVersion(),
	}
	h.mu.Lock()
	m := h.mirror
	h.mu.Unlock()
	if m == nil {
		return info
	}
	ms := m.Status()
	if ms.Done {
		if ms.Err == nil {
			info.LastFreeze = ms.LastFreeze
		}
		return info
	}
	info.IsMirroring = true
	info.ClientsAllowed = ms.Mode != mirror.ModeFreeze
	limit := ms.SpeedLimit
	if limit == 0 {
		limit = control.NoSpeedLimit
	}
	info.Migration = control.MigrationStatus{
		BytesPerSecond: ms.Speed,
		Duration:       ms.Duration,
		SecondsLeft:    ms.SecondsLeft,
		BytesLeft:      ms.BytesLeft,
		SpeedLimit:     limit,
		Pass:           ms.Pass,
		Mode:           ms.Mode.String(),
		Attempts:       ms.Attempts,
		BytesSent:      ms.BytesSent,
	}
	return info
}

// SetUpstreams implements control.Handler: a server has none.
func (h *instance) SetUpstreams([]string) error { return control.ErrNotProxy }

// SetACL builds the new list with the default-deny setting in force and
// hands it to the server, which disconnects the clients it rejects once
// their received requests are answered.

func (h *instance) SetACL(entries []string) error {
	h.aclMu.Lock()
	defer h.aclMu.Unlock()
	l, err := acl.New(entries, h.srv.ACL().DefaultDeny())
	if err != nil {
		return err
	}
	h.srv.SetACL(l)
	h.log.Info().Strs("acl", l.Entries()).Bool("default_deny", l.DefaultDeny()).Msg("access list replaced")
	return nil
}

// errNoControl refuses to migrate an export that has not arrived yet.
var errNoControl = errors.New("no control of the export yet: its migration into this server has not completed")

// Mirror starts a migration to req.Target and returns once the
// destination greeted, or why it could not.
func (h *instance) Mirror(ctx context.Context, req control.MirrorRequest) error {
	if !h.hasControl() {
		return errNoControl
	}
	if h.isSelf(req.Target) {
		return errSelf
	}
	h.mu.Lock()
	switch {
	case h.closing:
		h.mu.Unlock()
		return control.ErrShuttingDown
	case h.starting, h.mirror != nil && !isDone(h.mirror):
		h.mu.Unlock()
		return control.ErrMirrorRunning
	}
	h.starting = true
	h.mu.Unlock()
	defer func() {
		h.mu.Lock()
		h.starting = false
		h.mu.Unlock()
	}()

	cfg := mirror.Config{
		Export: mirror.ServedExport{Server: h.srv, Backend: h.file},
		Target: req.Target.String(),
		Unlink: func() error { return os.Remove(h.path) },
		Logger: h.log,
	}
	if req.Bind.IsValid() && !req.Bind.IsUnspecified() {
		cfg.Bind = req.Bind
	}
	if req.MaxBytesPerSecond != control.NoSpeedLimit {
		cfg.MaxBytesPerSecond = req.MaxBytesPerSecond
	}
	switch req.Action {
	case control.ActionUnlink:
		cfg.Finish = mirror.FinishUnlink
	case control.ActionNothing:
		cfg.Finish = mirror.FinishNothing
	default:
		cfg.Finish = mirror.FinishExit
	}
	m, err := mirror.Start(ctx, cfg)
	if err != nil {
		return startError(err)
	}
	h.mu.Lock()
	h.mirror, h.finish = m, cfg.Finish
	closing := h.closing
	h.mu.Unlock()
	if closing { // a signal came while connecting
		_ = m.Break()
		return control.ErrShuttingDown
	}
	go h.watch(m, cfg.Finish)
	return nil
}

// errSelf refuses a migration onto the export's own server.
var errSelf = errors.New("the destination is this server")

// isSelf reports whether target is this server's own NBD listener.
func (h *instance) isSelf(target netip.AddrPort) bool {
	la, ok := h.self.(*net.TCPAddr)
	if !ok || int(target.Port()) != la.Port {
		return false
	}
	ip := target.Addr().Unmap()
	if lip, ok := netip.AddrFromSlice(la.IP); ok && !lip.Unmap().IsUnspecified() {
		return lip.Unmap() == ip
	}
	if ip.IsLoopback() || ip.IsUnspecified() {
		return true
	}
	addrs, _ := net.InterfaceAddrs()
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if lip, ok := netip.AddrFromSlice(n.IP); ok && lip.Unmap() == ip {
				return true
			}
		}
	}
	return false
}

// startError words a failed start as the C flexnbd does.
func startError(err error) error {
	for _, p := range []struct{ from, to error }{
		{mirror.ErrConnect, control.ErrMirrorConnect},
		{mirror.ErrRejected, control.ErrMirrorRejected},
		{mirror.ErrNoGreeting, control.ErrMirrorNoGreeting},
		{mirror.ErrSizeMismatch, control.ErrMirrorSizeMismatch},
	} {
		if errors.Is(err, p.from) {
			return fmt.Errorf("%w: %w", p.to, err)
		}
	}
	return err
}

// watch ends the instance once a migration handed the export over.
func (h *instance) watch(m *mirror.Mirror, finish mirror.Finish) {
	<-m.Done()
	if m.Err() == nil && finish != mirror.FinishNothing {
		close(h.handedOff)
	}
}

func isDone(m *mirror.Mirror) bool {
	select {
	case <-m.Done():
		return true
	default:
		return false
	}
}

// running returns the migration in progress, if any.
func (h *instance) running() *mirror.Mirror {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.mirror == nil || isDone(h.mirror) {
		return nil
	}
	return h.mirror
}

// Break stops the migration in progress.
func (h *instance) Break(context.Context) error {
	h.mu.Lock()
	m := h.mirror
	h.mu.Unlock()
	if m == nil {
		return control.ErrNotMirroring
	}
	if isDone(m) {
		if m.Err() == nil {
			return control.ErrMirrorCompleted
		}
		return control.ErrNotMirroring
	}
	if errors.Is(m.Break(), mirror.ErrCompleted) {
		return control.ErrMirrorCompleted
	}
	h.log.Info().Msg("migration stopped by break")
	return nil
}

// SetMirrorSpeed changes the running migration's limit; 0 removes it.
func (h *instance) SetMirrorSpeed(bytesPerSecond uint64) error {
	m := h.running()
	if m == nil {
		return control.ErrNotMirroring
	}
	if bytesPerSecond == control.NoSpeedLimit {
		bytesPerSecond = 0
	}
	m.SetSpeedLimit(bytesPerSecond)
	h.log.Info().Uint64("max_bps", bytesPerSecond).Msg("migration speed limit changed")
	return nil
}

// WaitMirror waits for the migration in progress, or the last one, to end.
func (h *instance) WaitMirror(ctx context.Context) (string, error) {
	h.mu.Lock()
	m := h.mirror
	h.mu.Unlock()
	if m == nil {
		return "", control.ErrNotMirroring
	}
	select {
	case <-m.Done():
	case <-ctx.Done():
		return "", ctx.Err()
	}
	if err := m.Err(); err != nil {
		return "", fmt.Errorf("%w: %w", control.ErrMirrorStopped, err)
	}
	st := m.Status()
	return fmt.Sprintf("mirror completed: duration_ms=%d freeze_ms=%d attempts=%d bytes_sent=%d",
		st.Duration.Milliseconds(), st.LastFreeze.Milliseconds(), st.Attempts, st.BytesSent), nil
}

// stopMirror refuses new migrations and stops the one in progress,
// reporting whether there was one: a stop during a migration is a failure.
func (h *instance) stopMirror() bool {
	h.mu.Lock()
	h.closing = true
	h.mu.Unlock()
	m := h.running()
	if m == nil {
		return false
	}
	if errors.Is(m.Break(), mirror.ErrCompleted) {
		return false
	}
	h.log.Warn().Msg("migration abandoned: the server is stopping")
	return true
}
