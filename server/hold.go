package server

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
)

// A migration's final phase needs the export to stand still: requests that
// arrive must wait without an error, those already running must finish, and
// at the end the waiting ones either run after all (the hand-off failed) or
// never run here (the destination took over and their clients will send
// them there). Hold, Resume and DropHeld are that primitive.
//
// Every request the reader decodes enters the hold before it is validated
// or registered with the ordering gate, and leaves it once it has been
// executed (or refused). Entering increments a server-wide counter and only
// then looks at the flag; Hold sets the flag and only then looks at the
// counter. Both are sequentially consistent atomics, so either the request
// sees the hold and waits, or Hold sees the request and waits for it: no
// request can slip past a hold unseen.

// ErrHeld is returned by Hold when a hold is already in place.
var ErrHeld = errors.New("server: requests already held")

type hold struct {
	on      atomic.Bool
	running atomic.Int64 // requests between enter and leave
	waiting atomic.Int64 // requests waiting for the hold to end
	// wake is poked when a request leaves while the hold is on.
	wake chan struct{}

	mu sync.Mutex // guards the fields below
	// released is closed when the hold ends; dropped says how.
	released chan struct{}
	dropped  bool
}

func (h *hold) init() { h.wake = make(chan struct{}, 1) }

// Hold stops the server from starting requests: new ones wait, from every
// connection, new connections included, and none is answered with an error.
// It returns once every request that had started has finished, so nothing
// changes the export until Resume or DropHeld. If ctx ends first, the hold
// is lifted again and ctx's error returned. Held time does not count
// against the kill switch.
func (s *Server) Hold(ctx context.Context) error {
	h := &s.hold
	h.mu.Lock()
	if h.on.Load() {
		h.mu.Unlock()
		return ErrHeld
	}
	h.released = make(chan struct{})
	h.dropped = false
	h.on.Store(true)
	h.mu.Unlock()
	for h.running.Load() != 0 {
		select {
		case <-h.wake:
		case <-ctx.Done():
			s.Resume()
			return ctx.Err()
		}
	}
	return nil
}

// Resume ends a hold: the held requests run, in the order the gate would
// have given them. It does nothing when no hold is in place.
func (s *Server) Resume() { s.release(false) }

// DropHeld ends a hold by abandoning the held requests: they are never
// executed nor answered, and their connections close. Requests that arrive
// later are dropped the same way, so it is for a server about to close:
// the migration's hand-off, after which clients send their unanswered
// requests to the destination.
func (s *Server) DropHeld() { s.release(true) }

func (s *Server) release(drop bool) {
	h := &s.hold
	h.mu.Lock()
	defer h.mu.Unlock()
	if !h.on.Load() || h.dropped {
		return
	}
	h.dropped = drop
	if !drop {
		h.on.Store(false)
	}
	close(h.released)
}

// Held reports whether a hold is in place.
func (s *Server) Held() bool { return s.hold.on.Load() }

// HeldRequests counts the requests waiting for a hold to end.
func (s *Server) HeldRequests() int { return int(s.hold.waiting.Load()) }

// enter admits a request past the hold, waiting while one is in place. It
// reports false when the hold ended by dropping: the request must not run.
func (s *Server) enter() bool {
	h := &s.hold
	for {
		h.running.Add(1)
		if !h.on.Load() {
			return true
		}
		s.leave()
		h.mu.Lock()
		released, dropped := h.released, h.dropped
		h.mu.Unlock()
		if dropped {
			return false
		}
		if released != nil {
			h.waiting.Add(1)
			<-released
			h.waiting.Add(-1)
		}
	}
}

// leave ends what enter began.
func (s *Server) leave() {
	h := &s.hold
	if h.running.Add(-1) == 0 && h.on.Load() {
		select {
		case h.wake <- struct{}{}:
		default:
		}
	}
}
