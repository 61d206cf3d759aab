package proxy

import (
	"bufio"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/internal/rawsock"
	"github.com/flexnbd/flexnbd/nbd"
)

// handshakeTimeout bounds a downstream client's negotiation.
const handshakeTimeout = 10 * time.Second

// passFlags are the upstream's transmission flags a downstream client is
// offered; SEND_DF comes from the downstream handshake itself (a READ is
// always answered in one piece here).
const passFlags = nbd.FlagReadOnly | nbd.FlagSendFlush | nbd.FlagSendFUA | nbd.FlagRotational |
	nbd.FlagSendTrim | nbd.FlagSendWriteZeroes | nbd.FlagCanMultiConn | nbd.FlagSendCache |
	nbd.FlagSendFastZero

// op is one downstream request, kept until it is answered so that it can
// be sent again on a new upstream connection.
type op struct {
	seq     uint64
	req     nbd.Request // as the client sent it (its cookie)
	payload []byte      // WRITE data
	buf     []byte      // READ destination
	done    atomic.Bool // answered downstream
	// fetch, when not 0, is the doubled length a read-ahead asks
	// upstream (buf has room for it); pgen the prefetch generation.
	fetch uint32
	pgen  uint64
	// change marks a WRITE, TRIM or WRITE_ZEROES, which the prefetch
	// counts while in flight.
	change bool
	// arrived is when the client sent it, for MaxOutage.
	arrived time.Time
	// under conn.pmu
	sends  int       // times sent upstream
	sentAt time.Time // latest send
	gen    uint64    // connection generation of the latest send
}

// conn is one downstream client and its upstream connection.
//
// The reader decodes requests and sends them upstream itself, in arrival
// order, queued until it has read every request at hand and then sent
// together; the upstream client's reader answers each reply as it comes,
// and the answers gathered meanwhile are written together. When the
// upstream connection fails, the reconnector connects again and sends
// every unanswered request again, oldest first, before any newer one
// (smu orders the two senders).
type conn struct {
	p   *Proxy
	nc  net.Conn
	br  *bufio.Reader
	log zerolog.Logger

	ctx    context.Context // ends when the client is gone
	cancel context.CancelFunc

	size  uint64
	sess  *nbd.Session // downstream
	fence fence        // owned by the sender once serving

	// smu orders sends: the reader's, and the reconnector's replays.
	smu        sync.Mutex
	up         *nbd.Client                // under smu
	failing    bool                       // under smu: MaxOutage passed; answer EIO
	upShared   atomic.Pointer[nbd.Client] // up, for the watchdog
	gen        atomic.Uint64              // generation of up
	stale      atomic.Bool                // a reply is overdue: give up on up
	wake       chan struct{}              // to the reconnector
	slots      chan struct{}              // bounds the requests read and not answered
	pending    map[uint64]*op
	pmu        sync.Mutex // guards pending and the ops' send fields
	cache      prefetch
	unanswered sync.WaitGroup
	draining   atomic.Bool

	raw *rawsock.Conn // nc's socket I/O; nil for connections without a descriptor
	wmu sync.Mutex    // guards out and the downstream writes
	out []byte        // replies not yet written
	// wbufs is the scratch list of a reply written with its data.
	wbufs net.Buffers
}

func newConn(p *Proxy, nc net.Conn) *conn {
	raw := rawsock.New(nc)
	ctx, cancel := context.WithCancel(context.Background())
	return &conn{
		p:       p,
		nc:      nc,
		br:      bufio.NewReaderSize(downstreamReader(raw, nc), 64<<10),
		raw:     raw,
		log:     p.log.With().Str("client", nc.RemoteAddr().String()).Logger(),
		ctx:     ctx,
		cancel:  cancel,
		wake:    make(chan struct{}, 1),
		slots:   make(chan struct{}, 2*p.cfg.MaxInFlight),
		pending: map[uint64]*op{},
		fence:   fence{key: newFenceKey()},
		cache:   prefetch{size: p.cfg.Cache},
	}
}

// newFenceKey names a client's upstream session for the server's fence.
func newFenceKey() string {
	var b [16]byte
	_, _ = crand.Read(b[:])
	return "flexnbd-proxy-" + hex.EncodeToString(b[:])
}

// connected reports whether the client's upstream connection is up.
func (c *conn) connected() bool {
	up := c.upShared.Load()
	return up != nil && up.Err() == nil
}

// drain stops reading requests; those already read are still answered.
func (c *conn) drain() {
	c.draining.Store(true)
	_ = c.nc.SetReadDeadline(time.Now())
}

// abort drops the client at once.
func (c *conn) abort() {
	c.cancel()
	c.nc.Close()
}

func (c *conn) serve() {
	defer c.nc.Close()
	defer c.cancel()
	c.log.Info().Msg("client connected")
	var giveUp time.Time
	if c.p.cfg.MaxOutage > 0 {
		giveUp = time.Now().Add(c.p.cfg.MaxOutage)
	}
	// The client is greeted once an upstream has told us what to offer.
	up, err := c.p.connect(c.ctx, 0, giveUp, &c.fence, c.flushOut)
	if err != nil {
		c.log.Warn().Err(err).Msg("no upstream for a new client; closing it")
		return
	}
	c.up, c.size = up, up.Size()
	c.upShared.Store(up)
	c.noteFence()
	clean := false
	defer func() {
		// A connection with nothing left to answer says goodbye; any
		// other is cut, since a request stuck upstream would hold a
		// goodbye forever.
		if up := c.upShared.Load(); up != nil {
			if clean {
				up.Close()
			} else {
				up.Abort()
			}
		}
	}()
	flags := up.Flags() & passFlags
	if c.cache.size > 0 {
		// A read-ahead kept on one connection would not see what a
		// FLUSH on another made visible: no multi-conn promise.
		flags &^= nbd.FlagCanMultiConn
	}
	info := nbd.ExportInfo{Size: c.size, Flags: flags}
	_ = c.nc.SetDeadline(time.Now().Add(handshakeTimeout))
	c.sess, err = nbd.ServerHandshake(c.br, c.nc, &nbd.ServerConfig{
		Oldstyle: c.p.cfg.Oldstyle,
		Lookup:   func(string) (nbd.ExportInfo, error) { return info, nil },
		List:     func() []nbd.ExportInfo { return []nbd.ExportInfo{info} },
	})
	_ = c.nc.SetDeadline(time.Time{})
	if err != nil {
		if !errors.Is(err, nbd.ErrAborted) {
			c.log.Warn().Err(err).Msg("handshake failed")
		}
		return
	}

	reconnector := make(chan struct{})
	go func() {
		defer close(reconnector)
		c.reconnector()
	}()
	go c.watchdog()
	reason, gone := c.readLoop()
	if gone {
		// A client that left without DISC waits for nothing: what it
		// sent may or may not have run, as with any server.
		c.cancel()
	}
	// Everything read is answered (or the client is gone) before the
	// upstream connection closes.
	answered := make(chan struct{})
	go func() {
		c.unanswered.Wait()
		close(answered)
	}()
	select {
	case <-answered:
		clean = true
	case <-c.ctx.Done():
		// Cut the upstream connection so the reconnector and the
		// replies stop, and release what is left unanswered.
		if up := c.upShared.Load(); up != nil {
			up.Abort()
		}
	}
	c.flushOut()
	c.cancel()
	<-reconnector
	if !clean {
		c.failPending()
		<-answered
	}
	c.log.Info().Str("reason", reason).Msg("client disconnected")
}

// readLoop reads requests until the client leaves; it returns why, and
// whether the client is gone without DISC (so nothing need be answered).
func (c *conn) readLoop() (string, bool) {
	// Requests queued since the last send go now, whatever ended the loop.
	defer func() {
		c.smu.Lock()
		c.flushUp()
		c.smu.Unlock()
	}()
	var h [nbd.RequestHeaderSize]byte
	for seq := uint64(1); ; seq++ {
		if c.br.Buffered() == 0 {
			// Every request at hand is queued: send them before waiting.
			c.smu.Lock()
			c.flushUp()
			c.smu.Unlock()
		}
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			if c.draining.Load() {
				return "proxy shutting down", false
			}
			if errors.Is(err, io.EOF) {
				return "closed without DISC", true
			}
			return err.Error(), true
		}
		req, err := nbd.DecodeRequest(&h)
		if err != nil {
			c.log.Warn().Err(err).Msg("bad request; dropping the client")
			return "bad request", true
		}
		select {
		case c.slots <- struct{}{}:
		default:
			// Full: what is queued must go, or no answer frees a slot.
			c.smu.Lock()
			c.flushUp()
			c.smu.Unlock()
			select {
			case c.slots <- struct{}{}:
			case <-c.ctx.Done():
				return "aborted", true
			}
		}
		o := &op{seq: seq, req: req, arrived: time.Now()}
		switch req.Type {
		case nbd.CmdDisc:
			<-c.slots
			return "DISC", false
		case nbd.CmdWrite, nbd.CmdRead:
			if req.Length > nbd.DefaultMaxPayload {
				// The C proxy drops such a client too: its payload
				// would have to be buffered whole for a replay.
				c.log.Warn().Uint32("length", req.Length).Msg("request over 32 MiB; dropping the client")
				<-c.slots
				return "request too large", true
			}
			if req.Type == nbd.CmdRead {
				o.buf = getBuf(int(req.Length))
				break
			}
			o.payload = getBuf(int(req.Length))
			if _, err := io.ReadFull(c.br, o.payload); err != nil {
				putBuf(o.payload)
				<-c.slots
				return "short write payload", true
			}
		}
		c.unanswered.Add(1)
		c.submit(o)
	}
}

// submit sends o upstream, or leaves it pending for the reconnector, or
// fails it when the outage has outlasted MaxOutage.
func (c *conn) submit(o *op) {
	c.smu.Lock()
	defer c.smu.Unlock()
	if c.failing {
		c.p.stats.failed.Add(1)
		c.answer(o, nil, nbd.EIO, true)
		return
	}
	switch {
	case o.req.Type == nbd.CmdBlockStatus && c.sess.AllocationContext == 0:
		// Not negotiated: refused here, as a server would.
		c.answer(o, nil, nbd.EINVAL, true)
		return
	case o.req.Type == nbd.CmdRead && o.req.Length == 0:
		c.answer(o, nil, nil, true) // nothing to fetch
		return
	}
	switch o.req.Type {
	case nbd.CmdRead:
		if c.cache.hit(o.req.Offset, o.buf) {
			c.p.stats.cacheHits.Add(1)
			c.answer(o, nil, nil, true)
			return
		}
		if ok, gen := c.cache.plan(o.req.Offset, o.req.Length, c.size); ok {
			putBuf(o.buf)
			o.buf = getBuf(2 * int(o.req.Length))
			o.fetch, o.pgen = 2*o.req.Length, gen
		}
	case nbd.CmdWrite, nbd.CmdTrim, nbd.CmdWriteZeroes:
		o.change = true
		c.cache.change()
	}
	c.pmu.Lock()
	c.pending[o.seq] = o
	c.pmu.Unlock()
	if c.broken() {
		c.kick() // the reconnector sends it with the others
		return
	}
	c.send(o)
}

// broken reports whether the upstream connection must be replaced; the
// caller holds smu.
func (c *conn) broken() bool {
	return c.up == nil || c.up.Err() != nil || c.stale.Load()
}

// flushUp sends the queued requests; the caller holds smu.
func (c *conn) flushUp() {
	if c.up != nil && c.up.FlushRequests() != nil {
		c.kick()
	}
}

// upstreamRequest is the request as sent upstream: the client's cookie is
// replaced by the upstream client's, and DF dropped (the proxy answers a
// READ in one piece whatever the upstream does).
func upstreamRequest(o *op) nbd.Request {
	r := o.req
	r.Flags &^= nbd.CmdFlagDF
	if o.fetch != 0 {
		r.Length = o.fetch
	}
	return r
}

// send queues o on the current upstream connection; its reply is answered
// on the upstream reader goroutine. The caller holds smu.
func (c *conn) send(o *op) {
	c.pmu.Lock()
	if o.done.Load() {
		c.pmu.Unlock()
		return
	}
	o.sends++
	o.sentAt = time.Now()
	o.gen = c.gen.Load()
	replay := o.sends > 1
	c.pmu.Unlock()
	if replay {
		c.p.stats.replayed.Add(1)
	}
	up := c.up
	if o.req.Type == nbd.CmdBlockStatus && up.Session().AllocationContext == 0 {
		// An upstream without base:allocation: everything is data, which
		// is always a correct answer.
		c.answer(o, []nbd.Extent{{Length: o.req.Length}}, nil, true)
		return
	}
	err := up.StartAsync(upstreamRequest(o), o.payload, o.buf, func(ext []nbd.Extent, err error) {
		switch {
		case err != nil && !isReply(err):
			// The connection failed: o stays pending and is sent again.
			c.kick()
			return
		case errors.Is(err, nbd.ESHUTDOWN):
			// The server is stopping and did not run it: it goes
			// again to whichever server answers next.
			c.stale.Store(true)
			c.kick()
			return
		case err == nil && o.req.Type == nbd.CmdBlockStatus && len(ext) == 0:
			err = nbd.EIO // a server describing nothing broke the protocol
		}
		c.answer(o, ext, err, false)
	})
	if err != nil {
		c.kick()
	}
}

// isReply tells an error the server sent from a failed connection.
func isReply(err error) bool {
	var se *nbd.ServerError
	var errno nbd.Errno
	return errors.As(err, &se) || errors.As(err, &errno)
}

func (c *conn) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// downstreamReader is what the client's requests are read from.
func downstreamReader(raw *rawsock.Conn, nc net.Conn) io.Reader {
	if raw != nil {
		return raw
	}
	return nc
}
