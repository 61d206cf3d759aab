package server

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"golang.org/x/sys/unix"

	"github.com/flexnbd/flexnbd/nbd"
)

// conn serves one client. One goroutine reads requests and registers them
// with the ordering gate in arrival order. A request that can complete
// without waiting (a read found in the page cache, a plain write, nothing
// earlier in its way) runs right there on the reader, and its reply is held
// back until the reader has no more buffered requests: a burst of requests
// costs one read and one writev. A write that turns out slow hands the
// reading role to a new goroutine (promote). Anything that may wait runs on
// a goroutine of its own, up to MaxInFlight at once, so a slow request
// never holds up the others, and backpressure reaches the client through
// TCP.
type conn struct {
	// immutable after newConn
	srv     *Server
	nc      net.Conn
	remote  net.Addr // nc's peer, which the access list is checked against
	log     zerolog.Logger
	budget  *budget
	sock    *sockIO       // nil when nc has no file descriptor
	closed  chan struct{} // closed when the connection is gone
	arrived int64         // Server.clock at accept
	// heard is when the peer last sent anything during the handshake
	// (by Server.clock), 0 before it sent anything; see oldestHandshake.
	heard atomic.Int64

	// guarded by srv.mu: handshaking until negotiation ends; displaced
	// when a newer peer took its place at MaxClients (see accept).
	handshaking, displaced bool

	// immutable after the handshake
	sess       *nbd.Session
	br         *bufio.Reader
	hdrBuf     [nbd.RequestHeaderSize]byte // owned by the reader
	size       uint64
	maxPayload uint32

	// exportName is what the client asked for in the handshake, and
	// admitted whether the session policy let it in.
	exportName string
	admitted   bool

	// owned by whichever goroutine is reading (readers hand over in
	// order, and serve reads them after every reader has finished)
	received uint64  // requests decoded, DISC excluded
	hot      bool    // see warm
	lastCmd  nbd.Cmd // the last of them
	reqStart int64   // when the last header was read, if timed
	gotDisc  bool
	// flushedSeq is the sequence number (1-based, in arrival order) of
	// the latest FLUSH that succeeded.
	flushedSeq atomic.Uint64

	slots    chan struct{}  // one per request executing
	wg       sync.WaitGroup // request goroutines
	draining atomic.Bool
	// drainBy is when a draining connection's replies must have gone
	// (Unix nanoseconds; 0 while not draining).
	drainBy atomic.Int64

	out replyWriter

	// inlineSince is when the reader started running a write itself (by
	// Server.clock), 0 when it is not; the server's monitor promotes.
	inlineSince atomic.Int64
	promoteMu   sync.Mutex
	inlineReq   *request // guarded by promoteMu: the write the reader runs

	// turns (turns.go): the reader's wait state, the lock a nudge holds
	// while it sets the deadline, when the reader last waited or gave a
	// turn (by Server.clock, 0 for "just waited"; owned by the reader), and
	// the registration
	waitState  atomic.Int32
	nudgeMu    sync.Mutex
	runFrom    int64
	turnID     uint64
	turnEpfd   int
	turnEvents [16]unix.EpollEvent

	// requests being executed, for the kill switch; guarded by activeMu
	activeMu sync.Mutex
	active   map[*request]time.Time
}

func newConn(s *Server, nc net.Conn) *conn {
	c := &conn{
		srv:    s,
		nc:     nc,
		remote: nc.RemoteAddr(),
		log:    s.log.With().Str("peer", nc.RemoteAddr().String()).Logger(),
		budget: newBudget(s.cfg.MaxBufferBytes),
		sock:   newSockIO(nc),
		slots:  make(chan struct{}, s.cfg.MaxInFlight),
		closed: make(chan struct{}),
	}
	c.out.c = c
	c.arrived = s.clock()
	if s.cfg.KillSwitch > 0 {
		c.active = make(map[*request]time.Time)
	}
	return c
}

// drain asks the connection to finish what it has received and close:
// the read in progress is interrupted and anything read later is refused,
// and replies not taken within DrainTimeout drop the connection (a client
// that does not read them must not hold up a shutdown or a revocation).
func (c *conn) drain() {
	c.drainBy.CompareAndSwap(0, time.Now().Add(c.srv.cfg.DrainTimeout).UnixNano())
	c.draining.Store(true)
	_ = c.nc.SetReadDeadline(time.Now())
	_ = c.nc.SetWriteDeadline(time.Unix(0, c.drainBy.Load()))
}

func (c *conn) serve() {
	defer close(c.closed)
	defer c.srv.forget(c)
	defer c.nc.Close()
	defer func() {
		if p := recover(); p != nil {
			c.log.Error().Interface("panic", p).Bytes("stack", debug.Stack()).Msg("connection crashed")
		}
	}()
	c.log.Info().Msg("client connected")

	if err := c.handshake(); err != nil {
		if errors.Is(err, nbd.ErrAborted) || isClosedConn(err) {
			c.log.Info().Err(err).Msg("client left during handshake")
		} else {
			c.log.Warn().Err(err).Msg("handshake failed")
		}
		if c.admitted {
			c.sessionEnded(false) // the policy let it in: it hears it left
		}
		return
	}
	if c.srv.cfg.KillSwitch > 0 {
		stop := make(chan struct{})
		defer close(stop)
		go c.watchdog(stop)
	}
	if p := c.srv.cfg.Sessions; p != nil && p.Exclusive() {
		c.takeExport()
	}
	if c.sess.FenceKey != "" && !c.takeFence() {
		c.log.Info().Msg("a newer connection of this session came first; closing")
		c.sessionEnded(false)
		return
	}
	c.srv.turns.add(c)
	defer c.srv.turns.remove(c) // before the descriptor closes
	c.wg.Add(1)
	c.readLoop()
	c.wg.Wait()
	c.releaseReader()
	c.sessionEnded(c.gotDisc)
	c.log.Info().Msg("client disconnected")
}

// heardReader notes when the peer last sent something.
type heardReader struct{ c *conn }

func (h heardReader) Read(p []byte) (int, error) {
	n, err := h.c.nc.Read(p)
	if n > 0 {
		h.c.heard.Store(h.c.srv.clock())
	}
	return n, err
}

// errDisplaced ends a negotiation that took too long while the server
// was full and others were arriving.
var errDisplaced = errors.New("displaced by a newer client while the server was full")

func (c *conn) handshake() error {
	cfg := &c.srv.cfg
	// The handshake's messages are small: the large reader the requests
	// use is taken once they come (see readRequest).
	c.br = bufio.NewReaderSize(heardReader{c}, handshakeReaderSize)
	_ = c.nc.SetDeadline(time.Now().Add(cfg.HandshakeTimeout))
	if c.draining.Load() {
		// drain ran before the deadline above replaced its own.
		_ = c.nc.SetReadDeadline(time.Now())
	}
	sess, err := nbd.ServerHandshake(c.br, c.nc, &nbd.ServerConfig{
		Oldstyle: cfg.Oldstyle,
		Lookup:   c.lookup,
		List:     func() []nbd.ExportInfo { return []nbd.ExportInfo{c.srv.exportInfo()} },
		Closing:  c.draining.Load,
		Fence:    c.checkFence,
	})
	if err != nil {
		return err
	}
	c.srv.mu.Lock()
	displaced := c.displaced
	c.handshaking = false
	c.srv.mu.Unlock()
	if displaced {
		return errDisplaced
	}
	_ = c.nc.SetDeadline(time.Time{})
	if c.draining.Load() {
		// drain ran while the deadline above was being cleared.
		_ = c.nc.SetReadDeadline(time.Now())
		_ = c.nc.SetWriteDeadline(time.Unix(0, c.drainBy.Load()))
	}
	c.sess = sess
	c.size = sess.Export.Size
	c.maxPayload = sess.Export.MaxBlock
	c.log.Info().Bool("oldstyle", sess.Oldstyle).Bool("structured", sess.Structured).
		Bool("block_status", sess.AllocationContext != 0).Str("export", c.exportName).
		Msg("handshake complete")
	return nil
}

// lookup admits a client to the one export under the session policy.
func (c *conn) lookup(name string) (nbd.ExportInfo, error) {
	if !c.srv.serves(name) {
		c.log.Info().Str("export", name).Msg("client asked for an unknown export")
		return nbd.ExportInfo{}, &nbd.OptionError{Rep: nbd.RepErrUnknown,
			Message: "unknown export " + strconv.Quote(name) + "; this server has " + strconv.Quote(c.srv.cfg.ExportName)}
	}
	if p := c.srv.cfg.Sessions; p != nil {
		if err := p.Allow(name); err != nil {
			c.log.Info().Err(err).Str("export", name).Msg("client refused by the session policy")
			return nbd.ExportInfo{}, policyRefusal(err)
		}
	}
	c.exportName = name
	c.admitted = true
	return c.srv.exportInfo(), nil
}

// serves reports whether a client asking for name reaches the export.
func (s *Server) serves(name string) bool {
	return s.cfg.ExportName == "" || name == "" || name == s.cfg.ExportName ||
		slices.Contains(s.cfg.PolicyNames, name)
}

func (s *Server) exportInfo() nbd.ExportInfo {
	flags := nbd.FlagHasFlags | nbd.FlagSendFlush | nbd.FlagSendFUA | nbd.FlagSendTrim |
		nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero | nbd.FlagSendCache | nbd.FlagCanMultiConn
	if s.cfg.ReadOnly {
		// Offering what would only be refused invites clients to try.
		flags |= nbd.FlagReadOnly
		flags &^= nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagSendFastZero
	}
	return nbd.ExportInfo{
		Name:           s.cfg.ExportName,
		Description:    s.cfg.Description,
		Size:           s.cfg.Backend.Size(),
		Flags:          flags,
		MinBlock:       1,
		PreferredBlock: 4096,
		MaxBlock:       nbd.DefaultMaxPayload,
	}
}

// readLoop reads requests and starts each one, until the client leaves,
// breaks the protocol or the connection drains, or until another goroutine
// took over reading because this one was held up running a write.
func (c *conn) readLoop() {
	defer c.wg.Done()
	for {
		r, err := c.readRequest()
		if err != nil {
			c.out.flush()
			c.endReading(err)
			return
		}
		if r == nil { // answered while reading
			continue
		}
		if r.quick() && (r.span == nil || r.span.ready()) {
			if r.Type == nbd.CmdWrite {
				if !c.writeInline(r) {
					return
				}
				continue
			}
			if c.execute(r, true) {
				c.out.hold(r)
				continue
			}
		}
		c.needFlush(0)
		select {
		case c.slots <- struct{}{}:
		default:
			c.slots <- struct{}{}
			c.runFrom = 0 // it waited
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			c.execute(r, false)
			c.out.send(r)
			<-c.slots
		}()
	}
}

// promoteAfter is how long the reader may spend running a write itself
// before another goroutine takes over reading: a write that blocks (a
// throttled or failing disk) must not hold up the requests behind it for
// long. The server's monitor checks twice per period (Server.monitor). The
// period trades reaction time against wake-ups: a timer armed per write
// cost a wake-up of the runtime's poller each, and a 2.5 ms tick cost a
// quarter of 1 MiB write throughput on two cores; at 25 ms the cost is
// within noise (docs/DESIGN.md).
const promoteAfter = 50 * time.Millisecond

// writeInline runs a write on the reader. It reports false when the write
// took so long that another goroutine took over reading meanwhile; this
// one has then sent the reply and must stop reading.
func (c *conn) writeInline(r *request) bool {
	c.promoteMu.Lock()
	c.inlineReq = r
	c.promoteMu.Unlock()
	c.inlineSince.Store(c.srv.clock())
	c.execute(r, false)
	c.inlineSince.Store(0)
	c.promoteMu.Lock()
	demoted := r.demoted
	r.demoted = false
	if c.inlineReq == r {
		c.inlineReq = nil
	}
	c.promoteMu.Unlock()
	if demoted {
		c.out.send(r)
		<-c.slots // taken for this write by promote
		return false
	}
	c.out.hold(r)
	return true
}

// promote hands reading to a new goroutine while the reader is stuck in a
// write; the write then counts as one of the requests in flight. With every
// slot taken it does nothing, and the client waits as it would for any
// request beyond MaxInFlight.
func (c *conn) promote() {
	c.promoteMu.Lock()
	defer c.promoteMu.Unlock()
	r := c.inlineReq
	if r == nil {
		return
	}
	select {
	case c.slots <- struct{}{}:
	default:
		return
	}
	r.demoted = true
	c.inlineReq = nil
	c.wg.Add(1)
	go c.readLoop()
}

// needFlush sends held replies unless n more bytes are already buffered:
// a read that may block must not keep replies the client waits for.
func (c *conn) needFlush(n int) {
	if c.br.Buffered() < n || n == 0 {
		c.out.flush()
	}
}

// errDisconnect ends reading when the client sends NBD_CMD_DISC.
var errDisconnect = errors.New("client sent disconnect")

func (c *conn) endReading(err error) {
	// Its socket may still have data, which nobody will read: other readers
	// must not yield for it. (The descriptor is still open here.)
	c.srv.turns.remove(c)
	var ne net.Error
	switch {
	case errors.Is(err, errDisconnect):
		c.gotDisc = true
		c.log.Debug().Msg("disconnect requested")
	case errors.Is(err, errDropped):
		c.log.Info().Msg("held requests dropped; closing")
	case c.draining.Load() && (errors.As(err, &ne) && ne.Timeout() || errors.Is(err, errShutdown)):
		c.log.Debug().Msg("stopped reading for shutdown")
	case errors.Is(err, io.EOF) || isClosedConn(err):
		c.log.Debug().Err(err).Msg("connection closed by peer")
	default:
		c.log.Warn().Err(err).Msg("dropping connection")
	}
}

func isClosedConn(err error) bool {
	return errors.Is(err, net.ErrClosed) || errors.Is(err, io.ErrUnexpectedEOF) ||
		errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, io.EOF)
}

// errDropped ends reading when a hold ended by dropping held requests.
var errDropped = errors.New("held requests dropped")

// readRequest reads the next request. It returns nil, nil for a request it
// answered by itself (a refused request, or a write too large to buffer).
// Registration with the ordering gate happens here, so arrival order is
// registration order. A request returned has entered the server's hold
// (see Hold) and leaves it when executed.
func (c *conn) readRequest() (*request, error) {
	hdr := &c.hdrBuf
	if c.turnID != 0 && c.srv.numConns.Load() > 1 {
		c.maybeGiveTurns()
	}
	c.needFlush(len(hdr))
	var waitFrom int64
	if c.br.Buffered() == 0 && c.sock != nil && (c.br.Size() != requestReaderSize ||
		int(c.srv.numConns.Load()) > c.srv.cfg.LeanAbove) {
		if c.hot {
			waitFrom = c.srv.clock() // it waits holding its buffer
		} else {
			if err := c.idle(); err != nil {
				return nil, err
			}
			c.warm()
		}
	}
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		return nil, err
	}
	if waitFrom != 0 && c.srv.clock()-waitFrom > int64(hotWait) {
		c.cool()
	}
	req, err := nbd.DecodeRequest(hdr)
	if err != nil {
		if c.sess.Oldstyle {
			c.badMagic(hdr)
		}
		return nil, err
	}
	if req.Type == nbd.CmdDisc {
		return nil, errDisconnect
	}
	if c.srv.cfg.Metrics != nil {
		c.reqStart = c.srv.clock()
	}
	if !c.srv.enter() {
		return nil, errDropped
	}
	c.received++
	c.lastCmd = req.Type
	r, err := c.admit(req)
	if r == nil {
		c.srv.leave()
	}
	return r, err
}

// Read buffers: a small one for the handshake, and a large one for the
// requests. Once the server has more than LeanAbove connections, the large
// one is lent from a pool only while requests arrive, so that idle
// connections cost a few KiB instead of 128; below, a connection keeps it
// and saves the check for data before every wait (at queue depth 1, 13%
// of the requests per second on two cores).
const (
	handshakeReaderSize = 4 << 10
	requestReaderSize   = 128 << 10
)

var readerPool = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, requestReaderSize) }}

// idle makes sure the large reader serves the next request: when the
// client has sent nothing yet, it waits without holding any read buffer.
// c.br must hold nothing.
func (c *conn) idle() error {
	if c.sock.hasData() {
		if c.br.Size() != requestReaderSize {
			c.br = readerPool.Get().(*bufio.Reader)
			c.br.Reset(c.requestSource())
		}
		return nil
	}
	if c.br.Size() == requestReaderSize {
		c.br.Reset(nil)
		readerPool.Put(c.br)
	}
	c.br = nil
	err := c.waitForRequest()
	c.br = readerPool.Get().(*bufio.Reader)
	c.br.Reset(c.requestSource())
	return err
}

// hotWait is the longest a hot connection may wait for its next request
// and stay hot.
const hotWait = time.Second

// warm makes the connection hot if fewer than LeanAbove are: beyond
// LeanAbove connections, a connection whose requests follow each other
// within hotWait keeps its large reader while it waits, instead of peeking
// before every wait (a system call per request batch, which cost busy
// connections beside a thousand idle ones a quarter of their p99). At
// most LeanAbove connections hold a reader that way, as many as below the
// threshold; a hot connection that falls silent holds it until its next
// request shows it waited too long.
func (c *conn) warm() {
	for {
		n := c.srv.hot.Load()
		if int(n) >= c.srv.cfg.LeanAbove {
			return
		}
		if c.srv.hot.CompareAndSwap(n, n+1) {
			c.hot = true
			return
		}
	}
}

// cool ends the connection's hot state.
func (c *conn) cool() {
	if c.hot {
		c.hot = false
		c.srv.hot.Add(-1)
	}
}

// requestSource is what the large reader reads from: the socket through
// raw system calls where there is one. A regular read(2) (net.Conn's)
// enters the runtime's system-call state, which wakes its monitor thread
// whenever it sleeps because nothing else runs; at queue depth 1 the
// monitor slept and was woken again for every request, two context
// switches each, a third of the server's CPU per request (docs/DESIGN.md).
func (c *conn) requestSource() io.Reader {
	if c.sock != nil {
		return requestStream{c}
	}
	return c.nc
}

// release gives the large reader back when the connection ends.
func (c *conn) releaseReader() {
	c.cool()
	if c.br != nil && c.br.Size() == requestReaderSize {
		c.br.Reset(nil)
		readerPool.Put(c.br)
		c.br = nil
	}
}

// badMagic answers a request header that does not start with the request
// magic as the C flexnbd does before it disconnects: one simple reply with
// EBADMSG and whatever stands where the cookie would be.
func (c *conn) badMagic(hdr *[nbd.RequestHeaderSize]byte) {
	r := newRequest(c, nbd.Request{Cookie: binary.BigEndian.Uint64(hdr[8:16])})
	r.start = 0 // not a request: nothing to count
	r.setError(nbd.EBADMSG, "bad request magic")
	c.out.send(r)
}

// admit validates a decoded request and prepares it to run.
func (c *conn) admit(req nbd.Request) (*request, error) {
	c.srv.stats.Requests.Add(1)
	if c.draining.Load() {
		c.refuse(req, nbd.ESHUTDOWN, "server is shutting down")
		if req.Type == nbd.CmdWrite {
			return nil, errShutdown // its payload is not worth reading
		}
		return nil, nil
	}
	if errno, msg := c.validate(&req); errno != 0 {
		if req.Type == nbd.CmdWrite {
			if _, err := c.br.Discard(int(req.Length)); err != nil {
				return nil, fmt.Errorf("drain refused write: %w", err)
			}
		}
		c.refuse(req, errno, msg)
		return nil, nil
	}
	if req.Type == nbd.CmdWrite && req.Length > c.maxPayload {
		return nil, c.streamWrite(req)
	}

	r := newRequest(c, req)
	r.seq = c.received
	end := req.Offset + uint64(req.Length)
	switch req.Type {
	case nbd.CmdWrite:
		// The payload is read before the write takes its place among
		// overlapping requests: a client that stops sending it holds up
		// nobody but itself.
		r.reserve(int(req.Length))
		r.allocBuf(int(req.Length))
		c.needFlush(len(r.buf))
		if err := c.readPayload(r.buf); err != nil {
			r.free()
			return nil, fmt.Errorf("read write payload: %w", err)
		}
		r.span = c.srv.gate.register(req.Offset, end, true)
	case nbd.CmdRead:
		r.reserve(int(req.Length))
		r.span = c.srv.gate.register(req.Offset, end, false)
	case nbd.CmdTrim, nbd.CmdWriteZeroes:
		r.span = c.srv.gate.register(req.Offset, end, true)
	case nbd.CmdCache, nbd.CmdBlockStatus:
		r.span = c.srv.gate.register(req.Offset, end, false)
	}
	if c.active != nil {
		c.activeMu.Lock()
		c.active[r] = time.Now()
		c.activeMu.Unlock()
	}
	return r, nil
}

// readPayload fills p with the next bytes of the request stream: first
// what the buffered reader holds, then straight from the socket into p, so
// a large payload is not copied twice.
//
// A payload that stops arriving for PayloadTimeout fails the read, and so
// drops the connection.
func (c *conn) readPayload(p []byte) error {
	if len(p) <= c.br.Buffered() {
		_, err := io.ReadFull(c.br, p)
		return err
	}
	n, _ := c.br.Read(p[:c.br.Buffered()])
	p = p[n:]
	defer c.clearReadDeadline()
	for len(p) > 0 {
		c.setReadDeadline(time.Now().Add(c.srv.cfg.PayloadTimeout))
		var err error
		if c.sock != nil {
			n, err = c.sock.Read(p)
		} else {
			n, err = c.br.Read(p)
		}
		p = p[n:]
		if err == io.EOF {
			err = io.ErrUnexpectedEOF // the payload was cut short
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// setReadDeadline sets the read deadline unless the connection drains,
// whose deadline (now) must stay.
func (c *conn) setReadDeadline(t time.Time) {
	_ = c.nc.SetReadDeadline(t)
	if c.draining.Load() {
		// drain ran while the deadline above was being set.
		_ = c.nc.SetReadDeadline(time.Now())
	}
}

func (c *conn) clearReadDeadline() { c.setReadDeadline(time.Time{}) }

// refuse answers a request that will not be executed.
func (c *conn) refuse(req nbd.Request, errno nbd.Errno, msg string) {
	c.srv.stats.Errors.Add(1)
	c.log.Debug().Uint16("cmd", uint16(req.Type)).Uint64("offset", req.Offset).
		Uint32("length", req.Length).Uint32("errno", uint32(errno)).Msg(msg)
	r := newRequest(c, req)
	r.setError(errno, msg)
	c.out.hold(r)
}

// execute runs an admitted request and builds its reply. With nowait it
// may instead give up before changing anything and return false; the
// request is then still registered and must be executed again.
func (c *conn) execute(r *request, nowait bool) (done bool) {
	defer func() {
		if p := recover(); p != nil {
			c.log.Error().Interface("panic", p).Bytes("stack", debug.Stack()).Msg("request crashed")
			if r.span != nil {
				c.srv.gate.release(r.span)
				r.span = nil
			}
			r.setError(nbd.EIO, "internal error")
			done = true
		}
		if done {
			c.srv.leave()
		}
	}()
	if r.span != nil {
		c.srv.noteGateWait(r.span)
		r.span.wait()
	}
	var err error
	switch r.Type {
	case nbd.CmdRead:
		err = c.handleRead(r, nowait)
		if err == ErrWouldBlock {
			r.segs = r.segs[:0]
			return false
		}
	case nbd.CmdWrite:
		err = c.handleWrite(r)
	case nbd.CmdFlush:
		err = c.handleFlush(r)
	case nbd.CmdTrim:
		err = c.handleTrim(r)
	case nbd.CmdWriteZeroes:
		err = c.handleWriteZeroes(r)
	case nbd.CmdCache:
		err = c.handleCache(r)
	case nbd.CmdBlockStatus:
		err = c.handleBlockStatus(r)
	}
	if r.span != nil {
		c.srv.gate.release(r.span)
		r.span = nil
	}
	if err != nil {
		errno := nbd.ErrnoOf(err)
		c.srv.stats.Errors.Add(1)
		c.log.Warn().Err(err).Uint16("cmd", uint16(r.Type)).Uint64("offset", r.Offset).
			Uint32("length", r.Length).Msg("request failed")
		r.setError(errno, err.Error())
	}
	return true
}

// streamWrite executes a write too large to buffer (accepted in oldstyle
// mode, as the C flexnbd accepts them) piece by piece on the reader, so it
// needs no more memory than a normal request.
func (c *conn) streamWrite(req nbd.Request) error {
	const piece = 8 << 20
	r := newRequest(c, req)
	end := req.Offset + uint64(req.Length)
	r.reserve(piece)
	r.allocBuf(piece)
	sp := c.srv.gate.register(req.Offset, end, true)
	c.srv.noteGateWait(sp)
	sp.wait()
	var werr, rerr error
	for off := req.Offset; off < end; {
		n := min(uint64(piece), end-off)
		if rerr = c.readPayload(r.buf[:n]); rerr != nil {
			break
		}
		if werr == nil {
			werr = c.srv.cfg.Backend.WriteAt(r.buf[:n], off, false)
		}
		off += n
	}
	if werr == nil && rerr == nil && req.Flags&nbd.CmdFlagFUA != 0 {
		werr = c.srv.cfg.Backend.Sync()
	}
	c.srv.notifyWrite(req.Offset, uint64(req.Length))
	c.srv.gate.release(sp)
	if rerr != nil {
		r.free()
		return fmt.Errorf("read write payload: %w", rerr)
	}
	if werr != nil {
		c.srv.stats.Errors.Add(1)
		r.setError(nbd.ErrnoOf(werr), werr.Error())
	} else {
		c.srv.stats.BytesWritten.Add(uint64(req.Length))
		r.setOK()
	}
	c.out.hold(r)
	return nil
}

// watchdog enforces the kill switch: a request unanswered for longer than
// KillSwitch drops the whole connection, as the C flexnbd does.
func (c *conn) watchdog(stop <-chan struct{}) {
	limit := c.srv.cfg.KillSwitch
	tick := time.NewTicker(min(limit/4, time.Second))
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case now := <-tick.C:
			c.activeMu.Lock()
			var oldest time.Time
			for _, t := range c.active {
				if oldest.IsZero() || t.Before(oldest) {
					oldest = t
				}
			}
			c.activeMu.Unlock()
			if !oldest.IsZero() && now.Sub(oldest) > limit {
				c.log.Warn().Dur("limit", limit).Dur("age", now.Sub(oldest)).
					Msg("kill switch: request took too long; dropping client")
				c.nc.Close()
				// The stuck request may never return; the client
				// is gone as far as anyone can tell.
				c.srv.forget(c)
				return
			}
		}
	}
}
