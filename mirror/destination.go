package mirror

import (
	"errors"
	"sync"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// Destination is the session policy of a migration destination (`flexnbd
// listen`). Until the hand-off it serves the migration source and nobody
// else, one connection at a time. A newstyle source names itself, so a
// newer source connection (a retry after a silent network failure)
// replaces an older one, once the older one has finished what it had
// received. An oldstyle source cannot be told from anyone else: as in
// the C flexnbd, the first connection is the source and later ones are
// refused while it lasts. The migration is complete when the source ends a session
// with a successful FLUSH followed by DISC, or, from an oldstyle source
// (the C flexnbd, which sends no FLUSH), with DISC after its writes. A
// source that goes away otherwise leaves the destination waiting for its
// retry: partial data is never called complete.
type Destination struct {
	// Oldstyle: sources greet in the oldstyle, which names no export, so
	// whoever connects is taken for the source, as the C listen does.
	Oldstyle bool
	// ThenServe keeps serving everyone after the hand-off; otherwise
	// every later client is refused.
	ThenServe bool
	Logger    zerolog.Logger

	mu       sync.Mutex
	complete bool
	active   bool // an oldstyle source is connected
	done     chan struct{}
}

var _ server.SessionPolicy = (*Destination)(nil)

// Complete is closed once the migration into this destination completed.
func (d *Destination) Complete() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.done == nil {
		d.done = make(chan struct{})
	}
	return d.done
}

// HasControl reports whether the hand-off took place.
func (d *Destination) HasControl() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.complete
}

// errNotSource refuses clients until the hand-off.
var errNotSource = errors.New("migration destination: serving only its migration source until the hand-off")

// Allow implements server.SessionPolicy.
func (d *Destination) Allow(name string) error {
	d.mu.Lock()
	complete := d.complete
	d.mu.Unlock()
	switch {
	case complete && name == SourceExportName:
		// A source confirming a hand-off it did not see acknowledged.
		return &nbd.OptionError{Rep: nbd.RepErrPolicy, Message: completeMessage}
	case complete && d.ThenServe:
		return nil
	case complete:
		return errors.New("migration destination: migration complete, not serving")
	case d.Oldstyle:
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.active {
			return errors.New("migration destination: a source is connected already")
		}
		d.active = true
		return nil
	case name == SourceExportName:
		return nil
	}
	return errNotSource
}

// Exclusive implements server.SessionPolicy: one source session at a time
// until the hand-off.
func (d *Destination) Exclusive() bool { return !d.HasControl() }

// Ended implements server.SessionPolicy.
func (d *Destination) Ended(e server.SessionEnd) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if e.Oldstyle {
		d.active = false
	}
	if d.complete {
		return
	}
	ok := e.Disconnected && (e.FlushedLast || e.Oldstyle && e.Requests > 0)
	ev := d.Logger.Warn()
	if ok {
		ev = d.Logger.Info()
	}
	ev.Str("peer", e.Remote.String()).Uint64("requests", e.Requests).Bool("disconnected", e.Disconnected).
		Bool("flushed_last", e.FlushedLast).Bool("complete", ok).Msg("migration source session ended")
	if !ok {
		return
	}
	d.complete = true
	if d.done == nil {
		d.done = make(chan struct{})
	}
	close(d.done)
}

// Source is the session policy of a server that is not a migration
// destination (`flexnbd serve`): it serves everyone, except a migration
// source, which is refused in the handshake rather than allowed to copy
// an export over a live one (a mirror pointed at the wrong port, or at
// its own server). Oldstyle clients name no export and cannot be told
// apart.
type Source struct{}

var _ server.SessionPolicy = Source{}

// Allow implements server.SessionPolicy.
func (Source) Allow(name string) error {
	if name == SourceExportName {
		return errors.New("not a migration destination: start the destination with flexnbd listen")
	}
	return nil
}

// Exclusive implements server.SessionPolicy.
func (Source) Exclusive() bool { return false }

// Ended implements server.SessionPolicy.
func (Source) Ended(server.SessionEnd) {}
