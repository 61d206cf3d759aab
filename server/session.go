package server

import (
	"errors"
	"net"

	"github.com/flexnbd/flexnbd/nbd"
)

// SessionPolicy decides who may use the export and hears how sessions end.
// A migration destination uses it to serve only its source until the
// hand-off, one connection at a time, and to learn that the source finished.
// Its methods are called from connection goroutines, concurrently.
type SessionPolicy interface {
	// Allow decides during the handshake whether a client asking for
	// exportName may use the export (oldstyle clients ask for ""). An
	// error refuses it: a newstyle client gets the error reply of an
	// *nbd.OptionError, or NBD_REP_ERR_POLICY with the error's text; an
	// oldstyle client is disconnected before the greeting.
	Allow(exportName string) error
	// Exclusive reports whether a session starting now takes the export
	// alone. The previous exclusive session then stops reading, finishes
	// the requests it had received and closes before the new session's
	// first request is read, so a client that reconnects after a network
	// failure can never be overtaken by a request of its old connection.
	Exclusive() bool
	// Ended reports the end of every connection that Allow admitted,
	// once every request it sent has been executed: sessions, and
	// handshakes that failed after all.
	Ended(SessionEnd)
}

// SessionEnd describes how a session ended.
type SessionEnd struct {
	Remote     net.Addr
	ExportName string
	Oldstyle   bool
	// Requests counts the requests received before the session ended.
	Requests uint64
	// Disconnected is set when the client ended the session with
	// NBD_CMD_DISC; otherwise the connection broke or was closed.
	Disconnected bool
	// FlushedLast is set when the last request before the end was a FLUSH
	// that succeeded: everything the client wrote before it is durable.
	FlushedLast bool
}

// policyRefusal is how a refusal that is not an *nbd.OptionError reaches
// the client.
func policyRefusal(err error) error {
	if _, ok := err.(*nbd.OptionError); ok {
		return err
	}
	return &nbd.OptionError{Rep: nbd.RepErrPolicy, Message: err.Error()}
}

// takeExport makes c the exclusive session and waits until the previous
// one has gone.
func (c *conn) takeExport() {
	s := c.srv
	s.mu.Lock()
	prev := s.exclusive
	s.exclusive = c
	s.mu.Unlock()
	if prev == nil {
		return
	}
	prev.log.Info().Str("successor", c.nc.RemoteAddr().String()).Msg("session replaced by a newer one")
	prev.drain()
	<-prev.closed
}

// fenceHolder is the newest connection of a fence key (nbd.OptFence).
type fenceHolder struct {
	gen uint64
	c   *conn
}

// errStaleFence refuses a connection older than one already seen.
var errStaleFence = errors.New("a newer connection of this session exists")

// checkFence accepts OptFence during the handshake unless a connection
// with the same key and a generation at least as high came first.
func (c *conn) checkFence(key string, gen uint64) error {
	s := c.srv
	s.mu.Lock()
	defer s.mu.Unlock()
	if h, ok := s.fences[key]; ok && h.gen >= gen {
		return errStaleFence
	}
	return nil
}

// takeFence makes c its key's connection and waits until the previous one
// stopped reading and finished what it had read: requests the client sent
// on it and did not see answered either ran before c's first request is
// read or never run. It reports false when a newer connection of the key
// came meanwhile; c must then close without reading.
func (c *conn) takeFence() bool {
	s := c.srv
	key, gen := c.sess.FenceKey, c.sess.FenceGen
	s.mu.Lock()
	prev, ok := s.fences[key]
	if ok && prev.gen >= gen {
		s.mu.Unlock()
		return false
	}
	if s.fences == nil {
		s.fences = map[string]fenceHolder{}
	}
	s.fences[key] = fenceHolder{gen: gen, c: c}
	s.mu.Unlock()
	if prev.c != nil {
		prev.c.log.Info().Str("successor", c.nc.RemoteAddr().String()).Uint64("generation", gen).
			Msg("connection fenced by a newer one of its session")
		prev.c.drain()
		<-prev.c.closed
	}
	return true
}

// sessionEnded tells the policy how c's session ended.
func (c *conn) sessionEnded(disconnected bool) {
	s := c.srv
	s.mu.Lock()
	if s.exclusive == c {
		s.exclusive = nil
	}
	if c.sess != nil && c.sess.FenceKey != "" && s.fences[c.sess.FenceKey].c == c {
		delete(s.fences, c.sess.FenceKey)
	}
	s.mu.Unlock()
	p := s.cfg.Sessions
	if p == nil {
		return
	}
	p.Ended(SessionEnd{
		Remote:       c.nc.RemoteAddr(),
		ExportName:   c.exportName,
		Oldstyle:     s.cfg.Oldstyle,
		Requests:     c.received,
		Disconnected: disconnected,
		FlushedLast:  c.lastCmd == nbd.CmdFlush && c.flushedSeq.Load() == c.received,
	})
}
