package server

import (
	"net"
	"sync"
	"time"

	"github.com/flexnbd/flexnbd/nbd"
)

// request is one request from reading to the moment its reply was written.
type request struct {
	nbd.Request
	c        *conn
	span     *span
	buf      []byte  // pooled data: a WRITE's payload or a READ's data
	bufp     *[]byte // the pool's handle for buf
	budgeted int
	seq      uint64 // arrival order on its connection, from 1
	// demoted is set (under conn.promoteMu) when the reader running this
	// write handed reading over to another goroutine.
	demoted bool
	// start is when the request's header was read (by Server.clock), 0
	// when it is not timed; errno is the error its reply carries.
	start int64
	errno nbd.Errno

	// The reply: headers are encoded into hdr, and segs list what to send
	// in order, as ranges of hdr or buf (hdr may grow while it is built).
	hdr  []byte
	segs []seg

	// scratch for the handlers, kept across uses of the request; the
	// callbacks are bound once so that passing them allocates nothing
	runs        []run
	exts        []nbd.Extent
	extLimit    int
	addRunFn    func(off, length uint64, hole bool) bool
	addExtentFn func(off, length uint64, hole bool) bool
}

// run is a stretch of the export that is all data or all hole.
type run struct {
	off, len uint64
	hole     bool
}

type seg struct {
	data   bool // a range of buf rather than hdr
	lo, hi int
}

var requestPool = sync.Pool{New: func() any {
	r := &request{hdr: make([]byte, 0, 256)}
	r.addRunFn = r.addRun
	r.addExtentFn = r.addExtent
	return r
}}

func newRequest(c *conn, req nbd.Request) *request {
	r := requestPool.Get().(*request)
	r.c = c
	r.Request = req
	r.start, r.errno = c.reqStart, 0
	return r
}

// maxQuickRead bounds the reads run on the reader: copying more than this
// is better overlapped with reading the next request. Writes of any size
// run there: the payload has already been copied in, and measurements with
// 1 MiB writes showed the hand-off to another goroutine costing a fifth of
// the throughput (docs/DESIGN.md).
const maxQuickRead = 128 << 10

// quick reports whether the request is cheap enough to run on the reader:
// small reads, writes that need no sync.
func (r *request) quick() bool {
	if r.Flags&nbd.CmdFlagFUA != 0 {
		return false
	}
	return r.Type == nbd.CmdRead && r.Length <= maxQuickRead || r.Type == nbd.CmdWrite
}

// allocBuf gives the request a pooled data buffer of n bytes.
func (r *request) allocBuf(n int) {
	r.bufp = getBuf(n)
	r.buf = (*r.bufp)[:n]
}

// reserve takes n bytes of the connection's buffer budget, then of the
// server's, for this request. Held replies own budget too, so they are
// sent before waiting for more. Nobody waits for the server's budget while
// holding some of it beyond its own connection's, so waits end as requests
// finish.
func (r *request) reserve(n int) {
	if !r.c.budget.tryAcquire(n, true) {
		r.c.out.flush()
		r.c.budget.acquire(n, true)
	}
	// The connection's holding now includes n.
	light := r.c.budget.holding() <= lightHolding
	if !r.c.srv.memory.tryAcquire(n, light) {
		r.c.out.flush()
		r.c.srv.memory.acquire(n, light)
	}
	r.budgeted += n
}

// free returns everything the request holds; r must not be used after.
func (r *request) free() {
	if r.bufp != nil {
		putBuf(r.bufp)
		r.bufp, r.buf = nil, nil
	}
	r.c.budget.release(r.budgeted)
	r.c.srv.memory.release(r.budgeted)
	r.budgeted = 0
	if r.c.active != nil {
		r.c.activeMu.Lock()
		delete(r.c.active, r)
		r.c.activeMu.Unlock()
	}
	r.c = nil
	r.hdr = r.hdr[:0]
	r.segs = r.segs[:0]
	requestPool.Put(r)
}

// addHdr marks the bytes appended to hdr since mark as the next segment.
func (r *request) addHdr(mark int) {
	r.segs = append(r.segs, seg{lo: mark, hi: len(r.hdr)})
}

func (r *request) addData(lo, hi int) {
	r.segs = append(r.segs, seg{data: true, lo: lo, hi: hi})
}

// setOK makes the reply a plain success without data.
func (r *request) setOK() {
	r.hdr = nbd.AppendSimpleReply(r.hdr[:0], 0, r.Cookie)
	r.segs = append(r.segs[:0], seg{hi: len(r.hdr)})
}

// setError replaces whatever reply was built with an error. Structured
// connections get an error chunk carrying msg (a READ must); others a
// simple reply.
func (r *request) setError(errno nbd.Errno, msg string) {
	r.errno = errno
	if r.c.sess != nil && r.c.sess.Structured {
		r.hdr = nbd.AppendErrorChunk(r.hdr[:0], nbd.ReplyFlagDone, r.Cookie, errno, msg)
	} else {
		r.hdr = nbd.AppendSimpleReply(r.hdr[:0], errno, r.Cookie)
	}
	r.segs = append(r.segs[:0], seg{hi: len(r.hdr)})
}

// replyWriter sends replies. There is no writer goroutine: whoever queues
// a reply while nobody is writing becomes the writer and keeps sending, in
// one writev per round, everything queued meanwhile. The reader holds the
// replies of requests it ran itself until it has drained its input, so a
// burst of requests is answered with one writev.
type replyWriter struct {
	c *conn

	mu      sync.Mutex // guards queue, spare, busy and held
	queue   []*request
	spare   []*request
	busy    bool
	held    int         // bytes of data queued by hold and not yet written
	iov     net.Buffers // owned by the current writer
	failed  bool        // owned by the current writer
	renewAt time.Time   // owned by the current writer: when to push the deadline
}

// Replies held by the reader are sent anyway once there are this many.
const (
	maxHeldReplies = 64
	maxHeldBytes   = 1 << 20
)

// hold queues r's reply without writing, unless too much is held already.
func (w *replyWriter) hold(r *request) {
	w.mu.Lock()
	w.queue = append(w.queue, r)
	w.held += len(r.buf)
	if len(w.queue) < maxHeldReplies && w.held < maxHeldBytes || w.busy {
		w.mu.Unlock()
		return
	}
	w.writeQueued()
}

// flush writes whatever is queued, unless a writer is already at it.
func (w *replyWriter) flush() {
	w.mu.Lock()
	if w.busy || len(w.queue) == 0 {
		w.mu.Unlock()
		return
	}
	w.writeQueued()
}

// send queues r's reply and writes it now, unless a writer is already at
// it (and will pick it up).
func (w *replyWriter) send(r *request) {
	w.mu.Lock()
	w.queue = append(w.queue, r)
	if w.busy {
		w.mu.Unlock()
		return
	}
	w.writeQueued()
}

// writeQueued is entered with mu held and busy false, and returns with mu
// released once the queue is empty.
func (w *replyWriter) writeQueued() {
	w.busy = true
	for len(w.queue) > 0 {
		batch := w.queue
		w.queue = w.spare[:0]
		w.held = 0
		w.mu.Unlock()
		if m := w.c.srv.cfg.Metrics; m != nil {
			observe(m, batch, w.c.srv.clock())
		}
		w.write(batch)
		for i, r := range batch {
			r.free()
			batch[i] = nil
		}
		w.mu.Lock()
		w.spare = batch[:0]
	}
	w.busy = false
	w.mu.Unlock()
}

// observe counts the replies about to be written, before the client can
// see them: whoever scrapes after a reply arrived finds it counted.
func observe(m *Metrics, batch []*request, now int64) {
	for _, r := range batch {
		if r.start != 0 {
			m.observe(r.Type, r.Length, r.errno, time.Duration(now-r.start))
		}
	}
}

func (w *replyWriter) write(batch []*request) {
	if w.failed {
		return
	}
	w.iov = w.iov[:0]
	for _, r := range batch {
		for _, s := range r.segs {
			if s.data {
				w.iov = append(w.iov, r.buf[s.lo:s.hi])
			} else {
				w.iov = append(w.iov, r.hdr[s.lo:s.hi])
			}
		}
	}
	// Pushing the deadline forward costs a timer update, so do it only
	// when half of it has passed.
	now := time.Now()
	if now.After(w.renewAt) && w.c.drainBy.Load() == 0 {
		timeout := w.c.srv.cfg.WriteTimeout
		_ = w.c.nc.SetWriteDeadline(now.Add(timeout))
		w.renewAt = now.Add(timeout / 2)
		if by := w.c.drainBy.Load(); by != 0 {
			// drain ran meanwhile: its shorter deadline stands.
			_ = w.c.nc.SetWriteDeadline(time.Unix(0, by))
		}
	}
	var err error
	if w.c.sock != nil {
		_, err = w.c.sock.Writev(w.iov)
	} else {
		bufs := w.iov
		_, err = bufs.WriteTo(w.c.nc)
	}
	if err != nil {
		w.failed = true
		w.c.log.Warn().Err(err).Msg("writing replies failed; dropping connection")
		// Closing wakes the reader; requests still running finish
		// and their replies are discarded.
		w.c.nc.Close()
	}
	clear(w.iov[:cap(w.iov)])
}
