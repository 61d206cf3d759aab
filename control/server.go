package control

import (
	"bufio"
	"context"
	"errors"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/internal/accept"
)

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("control: server closed")

// Defaults for the Server's zero fields.
const (
	DefaultReadTimeout  = 10 * time.Second
	DefaultWriteTimeout = 10 * time.Second
	DefaultMaxConns     = 32
)

// Server answers control conversations on Unix listeners. Set its fields
// before Serve; they must not change afterwards.
type Server struct {
	Handler Handler
	Logger  zerolog.Logger
	// ReadTimeout bounds how long a peer may take to send its request.
	ReadTimeout time.Duration
	// WriteTimeout bounds how long a peer may take to take the reply.
	WriteTimeout time.Duration
	// MaxConns bounds the conversations in progress. A peer beyond it
	// takes the place of the conversation that has waited longest for its
	// request, if that one has been silent for a moment (idle peers must
	// not lock orchestrators out; up to twice MaxConns peers are let in
	// while the silent ones are all new); when every conversation is
	// running a command, the newcomer is told so and dropped.
	MaxConns int

	initOnce sync.Once
	ctx      context.Context // handed to the Handler; ends on Close
	cancel   context.CancelFunc

	mu        sync.Mutex // guards the fields below
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]*conversation
	closing   bool
	idle      *sync.Cond // signalled when conns shrinks
}

func (s *Server) init() {
	s.initOnce.Do(func() {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[net.Conn]*conversation)
		s.idle = sync.NewCond(&s.mu)
	})
}

func (s *Server) readTimeout() time.Duration {
	if s.ReadTimeout > 0 {
		return s.ReadTimeout
	}
	return DefaultReadTimeout
}

func (s *Server) writeTimeout() time.Duration {
	if s.WriteTimeout > 0 {
		return s.WriteTimeout
	}
	return DefaultWriteTimeout
}

func (s *Server) maxConns() int {
	if s.MaxConns > 0 {
		return s.MaxConns
	}
	return DefaultMaxConns
}

// Serve answers conversations on l until Shutdown or Close, which close l,
// and returns ErrServerClosed then. Each conversation runs on its own
// goroutine.
func (s *Server) Serve(l net.Listener) error {
	s.init()
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()

	if err := accept.Loop(l, s.isClosing, s.Logger, s.admit); err != nil {
		return err
	}
	return ErrServerClosed
}

// minIdle is how long a peer may stay silent before a newcomer may take
// its place: long enough to send a request, short enough that idle peers
// cannot keep others out.
const minIdle = 50 * time.Millisecond

// conversation is one peer's state, under Server.mu.
type conversation struct {
	since     time.Time
	waiting   bool // for its request: it may be displaced
	displaced bool // its read was cut short to make room
}

// admit starts a conversation. At MaxConns it displaces the one that has
// waited longest for its request, or, when all are running commands,
// refuses the newcomer.
func (s *Server) admit(nc net.Conn) {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	busy := false
	if len(s.conns) >= s.maxConns() {
		// The peer that has waited longest for its request, and at least
		// a moment (a peer that just connected has not had the time to
		// speak), makes room.
		now := time.Now()
		var oldest net.Conn
		var at time.Time
		young := false
		for c, cv := range s.conns {
			switch {
			case !cv.waiting:
			case now.Sub(cv.since) < minIdle:
				young = true
			case oldest == nil || cv.since.Before(at):
				oldest, at = c, cv.since
			}
		}
		switch {
		case oldest != nil:
			// Its read ends now; it hears why and leaves.
			s.conns[oldest].waiting = false
			s.conns[oldest].displaced = true
			_ = oldest.SetReadDeadline(now)
			s.Logger.Info().Dur("waited", now.Sub(at)).Msg("control peer idle while others wait; displaced")
		case young && len(s.conns) < 2*s.maxConns():
			// Only peers that just arrived are silent: take this one
			// too, beyond the bound; they are displaced once idle.
		default:
			busy = true
		}
	}
	s.conns[nc] = &conversation{since: time.Now(), waiting: !busy}
	s.mu.Unlock()
	if busy {
		go s.refuse(nc)
		return
	}
	go s.serveConn(nc)
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

func (s *Server) forget(nc net.Conn) {
	s.mu.Lock()
	delete(s.conns, nc)
	s.idle.Broadcast()
	s.mu.Unlock()
}

// refuse answers a peer beyond MaxConns without reading its request.
func (s *Server) refuse(nc net.Conn) {
	defer s.forget(nc)
	defer nc.Close()
	s.Logger.Warn().Int("max_conns", s.maxConns()).Msg("too many control connections; refusing one")
	s.writeReply(nc, Reply{CodeFailed, "too many control connections"})
}

func (s *Server) writeReply(nc net.Conn, r Reply) {
	_ = nc.SetWriteDeadline(time.Now().Add(s.writeTimeout()))
	if _, err := nc.Write(appendReply(nil, r)); err != nil {
		s.Logger.Info().Err(err).Msg("control peer left before its reply")
	}
}

func (s *Server) serveConn(nc net.Conn) {
	defer s.forget(nc)
	defer nc.Close()
	defer func() {
		if p := recover(); p != nil {
			s.Logger.Error().Interface("panic", p).Bytes("stack", debug.Stack()).Msg("control conversation crashed")
		}
	}()
	_ = nc.SetReadDeadline(time.Now().Add(s.readTimeout()))
	s.mu.Lock()
	if cv := s.conns[nc]; cv != nil && cv.displaced {
		// Displaced before its deadline was set: keep the cut.
		_ = nc.SetReadDeadline(time.Now())
	}
	s.mu.Unlock()
	lines, err := readRequest(bufio.NewReaderSize(nc, MaxLineBytes))
	s.mu.Lock()
	if cv := s.conns[nc]; cv != nil {
		cv.waiting = false
	}
	s.mu.Unlock()
	if err != nil {
		var reply Reply
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			reply = Reply{CodeFailed, "timed out waiting for the request"}
		case errors.Is(err, errLineTooLong), errors.Is(err, errRequestTooLong):
			reply = Reply{CodeFailed, err.Error()}
		default:
			s.Logger.Info().Err(err).Msg("control request unreadable")
			return
		}
		s.Logger.Warn().Err(err).Msg("control request refused")
		s.writeReply(nc, reply)
		return
	}
	// A command may take a while (a mirror connecting); only the reply
	// is bounded from here on.
	_ = nc.SetReadDeadline(time.Time{})
	reply := s.dispatch(lines)
	ev := s.Logger.Info()
	if len(lines) > 0 && lines[0] == CmdStatus {
		ev = s.Logger.Debug() // polled often
	}
	cmd := ""
	if len(lines) > 0 {
		cmd = lines[0]
	}
	ev.Str("command", cmd).Int("args", max(len(lines)-1, 0)).Int("code", reply.Code).
		Str("reply", reply.Message).Msg("control command")
	s.writeReply(nc, reply)
}

// Shutdown stops accepting (removing socket files made by Listen), lets
// conversations in progress finish, and returns once they have, or closes
// them and returns ctx's error when ctx ends first.
func (s *Server) Shutdown(ctx context.Context) error {
	s.init()
	s.beginClose()
	done := make(chan struct{})
	go func() {
		s.mu.Lock()
		for len(s.conns) > 0 {
			s.idle.Wait()
		}
		s.mu.Unlock()
		close(done)
	}()
	select {
	case <-done:
		s.cancel()
		return nil
	case <-ctx.Done():
		s.Close()
		return ctx.Err()
	}
}

// Close stops accepting, cancels the Handler calls in progress and closes
// every conversation without waiting for them.
func (s *Server) Close() error {
	s.init()
	err := s.beginClose()
	s.cancel()
	s.mu.Lock()
	for nc := range s.conns {
		nc.Close()
	}
	s.mu.Unlock()
	return err
}

func (s *Server) beginClose() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closing = true
	var err error
	for l := range s.listeners {
		if cerr := l.Close(); cerr != nil && err == nil && !errors.Is(cerr, net.ErrClosed) {
			err = cerr
		}
		delete(s.listeners, l)
	}
	return err
}
