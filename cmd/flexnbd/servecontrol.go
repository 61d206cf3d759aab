package main

import (
	"context"
	"errors"
	"os"
	"sync"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/server"
)

// errMirrorUnsupported answers mirror until the migration engine exists.
var errMirrorUnsupported = errors.New("mirror not supported by this build")

// serveHandler answers control commands for `serve` from its NBD server.
type serveHandler struct {
	srv *server.Server
	log zerolog.Logger
	// aclMu orders access list changes, so the list in force is the one
	// whose "updated" was sent last.
	aclMu sync.Mutex
}

var _ control.Handler = (*serveHandler)(nil)

// Status reports the server; serve always has control and admits clients
// while no migration is in its final phase.
func (h *serveHandler) Status() control.StatusInfo {
	st := h.srv.Stats()
	return control.StatusInfo{
		PID:                 os.Getpid(),
		Size:                h.srv.Size(),
		ClientsAllowed:      true,
		NumClients:          st.Clients,
		HasControl:          true,
		Uptime:              st.Uptime,
		BytesRead:           st.BytesRead,
		BytesWritten:        st.BytesWritten,
		Requests:            st.Requests,
		Errors:              st.Errors,
		ConnectionsSeen:     st.ConnectionsSeen,
		ConnectionsRejected: st.Rejected,
	}
}

// SetACL builds the new list with the default-deny setting in force and
// hands it to the server, which disconnects the clients it rejects once
// their received requests are answered.
func (h *serveHandler) SetACL(entries []string) error {
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

// Mirror is not available yet.
func (h *serveHandler) Mirror(context.Context, control.MirrorRequest) error {
	return errMirrorUnsupported
}

// Break has no migration to stop.
func (h *serveHandler) Break(context.Context) error { return control.ErrNotMirroring }

// SetMirrorSpeed has no migration to slow down.
func (h *serveHandler) SetMirrorSpeed(uint64) error { return control.ErrNotMirroring }
