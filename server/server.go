package server

import (
	"context"
	"errors"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/internal/accept"
	"github.com/flexnbd/flexnbd/internal/localtcp"
	"github.com/flexnbd/flexnbd/nbd"
)

// Config describes an export and how to serve it. Backend is required; the
// zero value of everything else is a sensible production default.
type Config struct {
	Backend Backend
	// ExportName is what NBD_OPT_LIST and NBD_INFO_NAME announce. When
	// it is set, a newstyle client must ask for it or for the empty name
	// (the default export, all a C flexnbd client knows): any other name
	// is refused with NBD_REP_ERR_UNKNOWN, so a client aimed at the wrong
	// export fails instead of using this one. Unset, any name reaches the
	// one export.
	ExportName string
	// PolicyNames are names that reach the session policy whatever
	// ExportName says: a migration source's.
	PolicyNames []string
	// Description is sent as NBD_INFO_DESCRIPTION and in NBD_OPT_LIST.
	Description string
	ReadOnly    bool
	// Oldstyle greets with the oldstyle handshake of the C flexnbd fleet;
	// out-of-range requests then fail with ENOSPC as they do there.
	Oldstyle bool
	// ACL admits peers; nil admits everyone.
	ACL *acl.List
	// KillSwitch, if positive, disconnects a client whose request has not
	// been answered within it (the C flexnbd's --killswitch: 120 s).
	KillSwitch time.Duration
	// HandshakeTimeout bounds a client's negotiation. Default 10 s.
	HandshakeTimeout time.Duration
	// MaxInFlight bounds the requests one connection has executing.
	// Default 64.
	MaxInFlight int
	// MaxBufferBytes bounds the data buffers one connection holds.
	// Default 128 MiB.
	MaxBufferBytes int
	// MaxMemory bounds the data buffers (WRITE payloads, READ replies)
	// of all connections together: beyond it clients wait for memory
	// instead of the process growing. Default 1 GiB.
	MaxMemory int
	// WriteTimeout drops a client that does not read its replies for this
	// long. Default 2 minutes.
	WriteTimeout time.Duration
	// PayloadTimeout drops a client whose WRITE payload stops arriving for
	// this long. Default 30 s.
	PayloadTimeout time.Duration
	// LeanAbove is the number of connections beyond which an idle one
	// gives back its 128 KiB read buffer while it waits (a few KiB stay),
	// at the price of a system call per request batch; negative: always.
	// Default 256.
	LeanAbove int
	// MaxClients bounds the connections served at once; a peer beyond it
	// is closed before any greeting, as one the access list rejects.
	// Default 4096.
	MaxClients int
	// DrainTimeout is how long a connection told to finish (Shutdown, an
	// access list that no longer admits it, a newer connection of its
	// fence key) may take to deliver its last replies before it is
	// dropped. Default 5 s.
	DrainTimeout time.Duration
	// OnWrite, if set, is called after every attempt to change the export
	// (WRITE, TRIM, WRITE_ZEROES), failed ones included since they may
	// have changed part of their range, while the range is still held in
	// the ordering gate and before the reply: the hook a mirror uses to
	// track dirty ranges.
	OnWrite func(off, length uint64)
	// Sessions, if set, decides who may use the export and hears how
	// sessions end (a migration destination); nil admits everyone.
	Sessions SessionPolicy
	Logger   zerolog.Logger

	// Metrics, if set, counts requests by command and error code, their
	// latencies and the waits in the ordering gate.
	Metrics *Metrics
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("server: closed")

// Server serves one export to any number of clients.
type Server struct {
	cfg  Config
	log  zerolog.Logger
	gate orderGate
	hold hold
	acl  atomic.Pointer[acl.List]
	// writeHook is Config.OnWrite; swapped while serving by a mirror.
	writeHook atomic.Pointer[func(off, length uint64)]

	mu        sync.Mutex // guards the fields below
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closing   bool
	connsDone *sync.Cond // signalled when conns shrinks
	exclusive *conn      // the session that has the export alone, if any
	fences    map[string]fenceHolder
	// fullLogged is when MaxClients last refused someone with a log line.
	fullLogged atomic.Int64
	// numConns is len(conns), read without the lock.
	numConns atomic.Int32
	// hot counts the connections that wait holding their large reader
	// beyond LeanAbove (conn.warm).
	hot atomic.Int32
	// turns wakes waiting readers for a reader in a long burst (turns.go).
	turns turns
	// memory is MaxMemory, shared by every connection's buffers.
	memory *budget

	stats Stats
	start time.Time
	// monitorWake starts the monitor when the first client arrives.
	monitorWake chan struct{}
	monitorOnce sync.Once
}

// Stats are counters over the server's lifetime; read them with Stats().
type Stats struct {
	BytesRead       atomic.Uint64
	BytesWritten    atomic.Uint64
	Requests        atomic.Uint64
	Errors          atomic.Uint64
	ConnectionsSeen atomic.Uint64
	Rejected        atomic.Uint64
	// Turns counts the times a reader that ran a quantum without waiting
	// yielded because other connections had unread requests (turns.go).
	Turns atomic.Uint64
}

// StatsSnapshot is a copy of the counters at one moment.
type StatsSnapshot struct {
	BytesRead, BytesWritten, Requests, Errors uint64
	ConnectionsSeen, Rejected, Turns          uint64
	Clients                                   int
	Uptime                                    time.Duration
}

// New returns a server for cfg. It does not take ownership of the backend.
func New(cfg Config) *Server {
	if cfg.MaxMemory <= 0 {
		cfg.MaxMemory = 1 << 30
	}
	if cfg.LeanAbove == 0 {
		cfg.LeanAbove = 256
	}
	if cfg.MaxClients <= 0 {
		cfg.MaxClients = 4096
	}
	if cfg.DrainTimeout <= 0 {
		cfg.DrainTimeout = 5 * time.Second
	}
	if cfg.PayloadTimeout <= 0 {
		cfg.PayloadTimeout = 30 * time.Second
	}
	if cfg.HandshakeTimeout <= 0 {
		cfg.HandshakeTimeout = 10 * time.Second
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 64
	}
	if cfg.MaxBufferBytes <= 0 {
		cfg.MaxBufferBytes = 128 << 20
	}
	if cfg.WriteTimeout <= 0 {
		cfg.WriteTimeout = 2 * time.Minute
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[*conn]struct{}),
		start:     time.Now(),
		memory:    newServerBudget(cfg.MaxMemory),
	}
	s.connsDone = sync.NewCond(&s.mu)
	s.hold.init()
	s.monitorWake = make(chan struct{}, 1)
	s.acl.Store(cfg.ACL)
	if cfg.OnWrite != nil {
		s.writeHook.Store(&cfg.OnWrite)
	}
	return s
}

// Size is the export size in bytes.
func (s *Server) Size() uint64 { return s.cfg.Backend.Size() }

// Stats returns a snapshot of the counters.
func (s *Server) Stats() StatsSnapshot {
	return StatsSnapshot{
		BytesRead:       s.stats.BytesRead.Load(),
		BytesWritten:    s.stats.BytesWritten.Load(),
		Requests:        s.stats.Requests.Load(),
		Errors:          s.stats.Errors.Load(),
		ConnectionsSeen: s.stats.ConnectionsSeen.Load(),
		Rejected:        s.stats.Rejected.Load(),
		Turns:           s.stats.Turns.Load(),
		Clients:         s.NumClients(),
		Uptime:          time.Since(s.start),
	}
}

// NumClients counts connected clients, idle ones and those still
// negotiating included.
func (s *Server) NumClients() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// ACL returns the access list in force.
func (s *Server) ACL() *acl.List { return s.acl.Load() }

// SetACL replaces the access list and disconnects connected clients it no
// longer admits. Their requests already received are finished and answered
// first; a request whose payload was still arriving is dropped unexecuted,
// so nothing is half-written; the exception is an oldstyle WRITE over 32
// MiB, which is streamed to the file as it arrives and stays written as
// far as it came.
func (s *Server) SetACL(l *acl.List) {
	s.acl.Store(l)
	s.mu.Lock()
	var kick []*conn
	for c := range s.conns {
		if !l.AllowsAddr(c.remote) {
			kick = append(kick, c)
		}
	}
	s.mu.Unlock()
	for _, c := range kick {
		c.log.Info().Msg("client no longer allowed by the access list; disconnecting")
		c.drain()
	}
}

// SetWriteHook replaces the write observer (nil removes it). Writes that
// complete after it returns are reported to fn.
func (s *Server) SetWriteHook(fn func(off, length uint64)) {
	if fn == nil {
		s.writeHook.Store(nil)
		return
	}
	s.writeHook.Store(&fn)
}

// Serve accepts connections on l until Shutdown or Close, and returns
// ErrServerClosed then. Each connection is served on its own goroutines.
func (s *Server) Serve(l net.Listener) error {
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

	if err := accept.Loop(l, s.isClosing, s.log, s.accept); err != nil {
		return err
	}
	return ErrServerClosed
}

// accept applies the access list before anything is sent, then starts the
// connection.
func (s *Server) accept(nc net.Conn) {
	s.stats.ConnectionsSeen.Add(1)
	if !s.acl.Load().AllowsAddr(nc.RemoteAddr()) {
		s.stats.Rejected.Add(1)
		s.log.Warn().Str("peer", nc.RemoteAddr().String()).Msg("rejected by access list")
		nc.Close()
		return
	}
	if tc, ok := nc.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
		_ = tc.SetKeepAliveConfig(net.KeepAliveConfig{
			Enable: true, Idle: 30 * time.Second, Interval: 10 * time.Second, Count: 3,
		})
		if localtcp.IsLocal(tc) {
			s.unpace(tc)
		}
	}
	c := newConn(s, nc)
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	var displaced *conn
	if len(s.conns) >= s.cfg.MaxClients {
		// Peers that connect and never finish negotiating must not keep
		// clients out: the oldest of them makes way.
		if displaced = s.oldestHandshake(); displaced == nil {
			s.mu.Unlock()
			s.stats.Rejected.Add(1)
			s.logFull(nc, "too many clients; refusing")
			nc.Close()
			return
		}
		displaced.handshaking, displaced.displaced = false, true
		delete(s.conns, displaced)
		s.numConns.Add(-1)
	}
	c.handshaking = true
	s.conns[c] = struct{}{}
	s.numConns.Add(1)
	s.mu.Unlock()
	if displaced != nil {
		s.stats.Rejected.Add(1)
		s.logFull(displaced.nc, "too many clients; dropping the oldest unfinished handshake")
		displaced.nc.Close()
	}
	s.monitorOnce.Do(func() { go s.monitor() })
	select {
	case s.monitorWake <- struct{}{}:
	default:
	}
	go c.serve()
}

// oldestHandshake is the negotiating connection a full server gives up
// first, nil if none is negotiating; s.mu is held. Peers that have sent
// nothing at all go first, the longest connected first; then the peer
// silent for longest. A real client sends its first bytes the moment the
// greeting reaches it, so a flood of peers that connect and wait cannot
// displace it. Every connection is looked at, which happens only when the
// server is full.
func (s *Server) oldestHandshake() *conn {
	for range 8 {
		var oldest *conn
		var oldestAt int64
		for c := range s.conns {
			if !c.handshaking {
				continue
			}
			at := c.heard.Load()
			if at == 0 {
				at = c.arrived - int64(1<<62) // before anyone who spoke
			}
			if oldest == nil || at < oldestAt {
				oldest, oldestAt = c, at
			}
		}
		// Bytes not read yet count: its goroutine may not have run.
		if oldest == nil || oldest.heard.Load() != 0 || oldest.sock == nil || !oldest.sock.queued() {
			return oldest
		}
		oldest.heard.Store(s.clock())
	}
	return nil
}

// logFull logs a refusal for MaxClients, one line a second under a flood.
func (s *Server) logFull(nc net.Conn, msg string) {
	if now := time.Now().UnixNano(); now-s.fullLogged.Load() > int64(time.Second) {
		s.fullLogged.Store(now)
		s.log.Warn().Int("max_clients", s.cfg.MaxClients).Str("peer", nc.RemoteAddr().String()).Msg(msg)
	}
}

// clock is a monotonic time in nanoseconds, never 0.
func (s *Server) clock() int64 { return int64(time.Since(s.start)) + 1 }

// monitor promotes readers stuck in a write (see conn.writeInline). It
// ticks only while there are clients, and ends with the server.
func (s *Server) monitor() {
	tick := time.NewTicker(promoteAfter / 2)
	defer tick.Stop()
	var conns []*conn
	for {
		s.mu.Lock()
		closing := s.closing
		conns = conns[:0]
		for c := range s.conns {
			conns = append(conns, c)
		}
		s.mu.Unlock()
		if closing && len(conns) == 0 {
			return
		}
		if len(conns) == 0 {
			<-s.monitorWake // also sent by beginClose
			continue
		}
		now := s.clock()
		for _, c := range conns {
			if since := c.inlineSince.Load(); since != 0 && now-since > int64(promoteAfter) {
				c.promote()
			}
		}
		<-tick.C
	}
}

func (s *Server) forget(c *conn) {
	s.mu.Lock()
	if _, ok := s.conns[c]; ok {
		delete(s.conns, c)
		s.numConns.Add(-1)
	}
	s.connsDone.Broadcast()
	s.mu.Unlock()
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// beginClose stops accepting and returns the live connections. Requests
// held by Hold are dropped: a closing server must not start them, and
// their readers must not wait for a Resume that will not come.
func (s *Server) beginClose() []*conn {
	s.DropHeld()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closing = true
	for l := range s.listeners {
		l.Close()
	}
	select {
	case s.monitorWake <- struct{}{}:
	default:
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	return conns
}

// Shutdown stops accepting, lets every connection finish the requests it
// has received (later ones get ESHUTDOWN), closes them, and syncs the
// export. If ctx ends first, remaining connections are closed abruptly and
// ctx's error is returned.
func (s *Server) Shutdown(ctx context.Context) error {
	for _, c := range s.beginClose() {
		c.drain()
	}
	done := make(chan struct{})
	go func() {
		s.mu.Lock()
		for len(s.conns) > 0 {
			s.connsDone.Wait()
		}
		s.mu.Unlock()
		close(done)
	}()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		s.closeConns()
		<-done
	}
	if serr := s.cfg.Backend.Sync(); serr != nil && err == nil {
		err = serr
	}
	return err
}

// Close stops accepting and closes every connection at once; requests in
// flight finish but their replies are lost. The export is synced.
func (s *Server) Close() error {
	s.beginClose()
	s.closeConns()
	s.mu.Lock()
	for len(s.conns) > 0 {
		s.connsDone.Wait()
	}
	s.mu.Unlock()
	return s.cfg.Backend.Sync()
}

func (s *Server) closeConns() {
	s.mu.Lock()
	for c := range s.conns {
		c.nc.Close()
	}
	s.mu.Unlock()
}

// DropClients disconnects every client gracefully, as Shutdown does for
// each, and returns once they are gone or ctx ends. New clients are still
// accepted; a migration refuses them through the ACL or Close.
func (s *Server) DropClients(ctx context.Context) error {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		c.drain()
	}
	for _, c := range conns {
		select {
		case <-c.closed:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// errShutdown is the reply to requests that arrive while draining.
var errShutdown = nbd.ESHUTDOWN

// unpace turns off the congestion control's pacing for a client on this
// host: it only delays replies there (see package localtcp).
func (s *Server) unpace(tc *net.TCPConn) {
	algorithm, changed, err := localtcp.AvoidPacing(tc)
	switch {
	case err != nil:
		s.log.Debug().Err(err).Str("peer", tc.RemoteAddr().String()).Msg("cannot avoid pacing for a local client")
	case changed:
		s.log.Debug().Str("peer", tc.RemoteAddr().String()).Str("congestion", algorithm).Msg("local client: pacing off")
	}
}
