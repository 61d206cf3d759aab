package control

import (
	"context"
	"errors"
	"math"
	"net/netip"
)

// Handler carries out the commands. The Server calls it from one goroutine
// per conversation, so its methods must be safe for concurrent use. An
// error's text becomes the reply's message after "1: ", except for the
// sentinel errors below, which the Server words as the C flexnbd does for
// the command at hand.
type Handler interface {
	// Status describes the instance. It must not block: orchestrators
	// poll it, also while other commands are in progress.
	Status() StatusInfo
	// SetACL replaces the access list with entries (possibly none),
	// keeping the default-deny setting, and disconnects clients the new
	// list rejects. A bad entry changes nothing and is reported by an
	// error whose text is "bad spec: ENTRY".
	SetACL(entries []string) error
	// Mirror starts a migration and returns once it has started (the
	// destination answered) or failed to. ctx bounds only that wait; the
	// migration itself outlives the conversation.
	Mirror(ctx context.Context, req MirrorRequest) error
	// Break abandons a running migration: ErrNotMirroring if there is
	// none, ErrMirrorCompleted if it finished first.
	Break(ctx context.Context) error
	// SetMirrorSpeed changes the running migration's speed limit in
	// bytes per second: ErrNotMirroring if there is none.
	SetMirrorSpeed(bytesPerSecond uint64) error
	// WaitMirror waits until the migration in progress, or the last one,
	// has ended and words its outcome: a nil error when it completed,
	// ErrMirrorStopped when it was stopped, ErrNotMirroring when there
	// was none. ctx ends the wait, not the migration.
	WaitMirror(ctx context.Context) (string, error)
	// SetUpstreams replaces a proxy's upstream list (at least one entry,
	// each host:port or a Unix socket path), used from the next
	// reconnection on. An instance that is not a proxy returns
	// ErrNotProxy.
	SetUpstreams(upstreams []string) error
}

// ErrNotProxy answers a proxy's command sent to a server.
var ErrNotProxy = errors.New("not a proxy")

// ErrProxy answers a server's command sent to a proxy.
var ErrProxy = errors.New("not supported by a proxy")

// NoSpeedLimit is the speed limit that does not limit, as the C flexnbd
// spells it: a mirror started without one, and a status line without
// migration_speed_limit.
const NoSpeedLimit = math.MaxUint64

// FinishAction is what the source does after a successful migration.
type FinishAction int

// The finish actions, named as on the wire.
const (
	// ActionExit closes the server and exits: the default.
	ActionExit FinishAction = iota
	// ActionUnlink also removes the file first, so only the destination's
	// copy remains.
	ActionUnlink
	// ActionNothing keeps serving.
	ActionNothing
)

var actionNames = [...]string{ActionExit: "exit", ActionUnlink: "unlink", ActionNothing: "nothing"}

// String returns the action's wire name.
func (a FinishAction) String() string {
	if a >= 0 && int(a) < len(actionNames) {
		return actionNames[a]
	}
	return "unknown"
}

// MirrorRequest is a parsed mirror command.
type MirrorRequest struct {
	// Target is the destination's NBD address.
	Target netip.AddrPort
	Action FinishAction
	// Bind is the local address to connect from; the zero Addr lets the
	// system choose.
	Bind netip.Addr
	// MaxBytesPerSecond limits the copy; NoSpeedLimit by default.
	MaxBytesPerSecond uint64
}

// Errors a Handler returns for the outcomes the C flexnbd words in its own
// way; the Server turns each into that wording.
var (
	// ErrNotMirroring: break or mirror_max_bps without a migration.
	ErrNotMirroring = errors.New("not mirroring")
	// ErrMirrorCompleted: break after the migration finished.
	ErrMirrorCompleted = errors.New("mirror completed")
	// ErrMirrorRunning: mirror while one runs.
	ErrMirrorRunning = errors.New("mirror already running")
	// The destination could not be reached, refused us, did not greet us
	// in time, or exports a different size.
	ErrMirrorConnect      = errors.New("Mirror failed to connect")
	ErrMirrorRejected     = errors.New("Mirror was rejected")
	ErrMirrorNoGreeting   = errors.New("Remote server failed to respond")
	ErrMirrorSizeMismatch = errors.New("Remote size does not match local size")
	// ErrShuttingDown: mirror while the instance is stopping.
	ErrShuttingDown = errors.New("shutting down")
	// ErrMirrorStopped: the migration waited for was stopped by break or
	// a shutdown.
	ErrMirrorStopped = errors.New("mirror stopped")
)

// Replies the C flexnbd words exactly so.
const (
	msgUpdated         = "updated"
	msgMirrorStarted   = "Mirror started"
	msgMirrorStopped   = "mirror stopped"
	msgNotMirroringBps = "Not currently mirroring"
	msgBadFormat       = "Bad format"
	msgMissingCommand  = "missing command"
	msgUnknownCommand  = "unknown command"
)
