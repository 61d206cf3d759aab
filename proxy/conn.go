package proxy

import (
	"bufio"
	"context"
	crand "crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rs/zerolog"

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
	sent    bool        // sent upstream at least once (owned by the sender)
	done    atomic.Bool // answered downstream
}

// conn is one downstream client and its upstream connection.
//
// The reader decodes requests in arrival order and hands them to the
// sender, which alone sends upstream, in that order; a waiter goroutine
// per request collects the reply and answers the client. When the
// upstream connection fails, the sender connects again and sends every
// unanswered request again, oldest first, before any newer one.
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

	ops        chan *op      // reader to sender
	wake       chan struct{} // waiters to sender: the upstream failed
	up         *nbd.Client   // owned by the sender
	pending    map[uint64]*op
	pmu        sync.Mutex // guards pending
	unanswered sync.WaitGroup
	connected  atomic.Bool
	draining   atomic.Bool

	wmu sync.Mutex // serialises replies
	hdr []byte     // reply header scratch, under wmu
}

func newConn(p *Proxy, nc net.Conn) *conn {
	ctx, cancel := context.WithCancel(context.Background())
	return &conn{
		p:       p,
		nc:      nc,
		br:      bufio.NewReaderSize(nc, 64<<10),
		log:     p.log.With().Str("client", nc.RemoteAddr().String()).Logger(),
		ctx:     ctx,
		cancel:  cancel,
		ops:     make(chan *op, 16),
		wake:    make(chan struct{}, 1),
		pending: map[uint64]*op{},
		fence:   fence{key: newFenceKey()},
	}
}

// newFenceKey names a client's upstream session for the server's fence.
func newFenceKey() string {
	var b [16]byte
	_, _ = crand.Read(b[:])
	return "flexnbd-proxy-" + hex.EncodeToString(b[:])
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
	up, err := c.p.connect(c.ctx, 0, giveUp, &c.fence)
	if err != nil {
		c.log.Warn().Err(err).Msg("no upstream for a new client; closing it")
		return
	}
	c.up, c.size = up, up.Size()
	c.connected.Store(true)
	c.noteFence()
	defer func() {
		c.connected.Store(false)
		if c.up != nil {
			c.up.Close()
		}
	}()
	info := nbd.ExportInfo{Size: c.size, Flags: up.Flags() & passFlags}
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

	sent := make(chan struct{})
	go func() {
		defer close(sent)
		c.sendLoop()
	}()
	reason := c.readLoop()
	close(c.ops)
	<-sent
	// Everything read is answered (or the client is gone) before the
	// upstream connection closes.
	answered := make(chan struct{})
	go func() {
		c.unanswered.Wait()
		close(answered)
	}()
	select {
	case <-answered:
	case <-c.ctx.Done():
	}
	c.log.Info().Str("reason", reason).Msg("client disconnected")
}

// readLoop reads requests until the client leaves; it returns why.
func (c *conn) readLoop() string {
	var h [nbd.RequestHeaderSize]byte
	for seq := uint64(1); ; seq++ {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			if c.draining.Load() {
				return "proxy shutting down"
			}
			if errors.Is(err, io.EOF) {
				return "closed without DISC"
			}
			return err.Error()
		}
		req, err := nbd.DecodeRequest(&h)
		if err != nil {
			c.log.Warn().Err(err).Msg("bad request; dropping the client")
			return "bad request"
		}
		o := &op{seq: seq, req: req}
		switch req.Type {
		case nbd.CmdDisc:
			return "DISC"
		case nbd.CmdWrite, nbd.CmdRead:
			if req.Length > nbd.DefaultMaxPayload {
				// The C proxy drops such a client too: its payload
				// would have to be buffered whole for a replay.
				c.log.Warn().Uint32("length", req.Length).Msg("request over 32 MiB; dropping the client")
				return "request too large"
			}
			if req.Type == nbd.CmdRead {
				o.buf = make([]byte, req.Length)
				break
			}
			o.payload = make([]byte, req.Length)
			if _, err := io.ReadFull(c.br, o.payload); err != nil {
				return "short write payload"
			}
		}
		c.unanswered.Add(1)
		select {
		case c.ops <- o:
		case <-c.ctx.Done():
			c.unanswered.Done()
			return "aborted"
		}
	}
}

// sendLoop sends requests upstream in arrival order and reconnects and
// replays when the upstream connection fails.
func (c *conn) sendLoop() {
	for {
		select {
		case o, ok := <-c.ops:
			if !ok {
				return
			}
			c.pmu.Lock()
			c.pending[o.seq] = o
			c.pmu.Unlock()
			if c.up == nil || c.up.Err() != nil {
				c.reconnect()
				continue // reconnect sent it with the others
			}
			c.send(o)
		case <-c.wake:
			if c.up != nil && c.up.Err() != nil {
				c.reconnect()
			}
		case <-c.ctx.Done():
			return
		}
	}
}

// upstreamRequest is the request as sent upstream: the client's cookie is
// replaced by the upstream client's, and DF dropped (the proxy answers a
// READ in one piece whatever the upstream does).
func upstreamRequest(r nbd.Request) nbd.Request {
	r.Flags &^= nbd.CmdFlagDF
	return r
}

// send starts o on the current upstream connection and leaves a waiter
// for its reply.
func (c *conn) send(o *op) {
	if o.done.Load() {
		return
	}
	if o.sent {
		c.p.stats.replayed.Add(1)
	}
	o.sent = true
	up := c.up
	if o.req.Type == nbd.CmdBlockStatus && up.Session().AllocationContext == 0 {
		// An upstream without base:allocation: everything is data, which
		// is always a correct answer.
		c.answer(o, []nbd.Extent{{Length: o.req.Length}}, nil)
		return
	}
	ctx, cancel := context.WithTimeout(c.ctx, c.p.cfg.Timeout)
	pend, err := up.Start(ctx, upstreamRequest(o.req), o.payload, o.buf)
	if err != nil {
		cancel()
		c.kick()
		return
	}
	go func() {
		ext, err := pend.Wait()
		cancel()
		if err != nil && !isReply(err) {
			// The connection failed: o stays pending and is sent again.
			c.kick()
			return
		}
		c.answer(o, ext, err)
	}()
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

// reconnect replaces a failed upstream connection and sends every
// unanswered request again, oldest first. With MaxOutage, requests still
// unanswered when it passes fail with EIO, and so does every request
// while the upstream stays unreachable.
func (c *conn) reconnect() {
	if c.up != nil {
		c.log.Warn().Err(c.up.Err()).Msg("upstream connection lost; reconnecting")
		c.up.Abort()
		c.up = nil
	}
	c.connected.Store(false)
	c.p.stats.reconnects.Add(1)
	start := time.Now()
	var giveUp time.Time
	if c.p.cfg.MaxOutage > 0 {
		giveUp = start.Add(c.p.cfg.MaxOutage)
	}
	for {
		up, err := c.p.connect(c.ctx, c.size, giveUp, &c.fence)
		if err == nil {
			c.up = up
			break
		}
		if c.ctx.Err() != nil {
			return
		}
		// The outage outlasted MaxOutage: fail what waits, and keep
		// trying; requests arriving meanwhile fail at once.
		c.failPending()
		giveUp = time.Now().Add(time.Second)
		if c.drainFailing() {
			return
		}
	}
	c.noteFence()
	outage := time.Since(start)
	c.p.noteOutage(outage)
	c.connected.Store(true)
	c.pmu.Lock()
	ops := make([]*op, 0, len(c.pending))
	for _, o := range c.pending {
		ops = append(ops, o)
	}
	c.pmu.Unlock()
	slices.SortFunc(ops, func(a, b *op) int { return int(int64(a.seq - b.seq)) })
	c.log.Info().Dur("outage", outage).Int("replayed", len(ops)).Msg("upstream reconnected")
	for _, o := range ops {
		c.send(o)
	}
}

// noteFence warns when the upstream cannot fence: a replay after a
// timeout could then be overtaken by its original.
func (c *conn) noteFence() {
	if !c.up.Session().Fenced {
		c.log.Warn().Msg("upstream does not take fences (not a flexnbd server): a request replayed after a timeout may be overtaken by its original")
	}
}

// failPending answers every pending request with EIO.
func (c *conn) failPending() {
	c.pmu.Lock()
	ops := make([]*op, 0, len(c.pending))
	for _, o := range c.pending {
		ops = append(ops, o)
	}
	c.pmu.Unlock()
	for _, o := range ops {
		c.p.stats.failed.Add(1)
		c.answer(o, nil, nbd.EIO)
	}
}

// drainFailing answers the requests that arrive within the next second
// with EIO; it reports whether the client went away meanwhile.
func (c *conn) drainFailing() bool {
	t := time.NewTimer(time.Second)
	defer t.Stop()
	for {
		select {
		case o, ok := <-c.ops:
			if !ok {
				return true
			}
			c.p.stats.failed.Add(1)
			c.answer(o, nil, nbd.EIO)
		case <-t.C:
			return false
		case <-c.ctx.Done():
			return true
		}
	}
}

// answer sends o's reply to the client, once.
func (c *conn) answer(o *op, ext []nbd.Extent, err error) {
	if !o.done.CompareAndSwap(false, true) {
		return
	}
	c.pmu.Lock()
	delete(c.pending, o.seq)
	c.pmu.Unlock()
	defer c.unanswered.Done()
	var errno nbd.Errno
	var msg string
	if err != nil {
		errno = nbd.EIO
		var se *nbd.ServerError
		switch {
		case errors.As(err, &se):
			errno, msg = se.Code, se.Message
		case errors.As(err, &errno):
		}
	}
	cookie := o.req.Cookie
	c.wmu.Lock()
	defer c.wmu.Unlock()
	h := c.hdr[:0]
	var data []byte
	switch {
	case errno != 0 && c.sess.Structured:
		h = nbd.AppendErrorChunk(h, nbd.ReplyFlagDone, cookie, errno, msg)
	case errno != 0:
		h = nbd.AppendSimpleReply(h, errno, cookie)
	case o.req.Type == nbd.CmdRead && c.sess.Structured:
		h = nbd.AppendOffsetDataHeader(h, nbd.ReplyFlagDone, cookie, o.req.Offset, o.req.Length)
		data = o.buf
	case o.req.Type == nbd.CmdRead:
		h = nbd.AppendSimpleReply(h, 0, cookie)
		data = o.buf
	case o.req.Type == nbd.CmdBlockStatus:
		h = nbd.AppendBlockStatus(h, nbd.ReplyFlagDone, cookie, c.sess.AllocationContext, ext)
	default:
		h = nbd.AppendSimpleReply(h, 0, cookie)
	}
	c.hdr = h
	bufs := net.Buffers{h}
	if len(data) > 0 {
		bufs = append(bufs, data)
	}
	if _, err := bufs.WriteTo(c.nc); err != nil {
		c.log.Debug().Err(err).Msg("reply not delivered")
		c.abort()
	}
}
