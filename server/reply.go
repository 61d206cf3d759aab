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
	buf      []byte // pooled data: a WRITE's payload or a READ's data
	budgeted int

	// The reply: headers are encoded into hdr, and segs list what to send
	// in order, as ranges of hdr or buf (hdr may grow while it is built).
	hdr  []byte
	segs []seg

	// scratch for the handlers, kept across uses of the request
	runs []run
	exts []nbd.Extent
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

var requestPool = sync.Pool{New: func() any { return &request{hdr: make([]byte, 0, 256)} }}

func newRequest(c *conn, req nbd.Request) *request {
	r := requestPool.Get().(*request)
	r.c = c
	r.Request = req
	return r
}

// reserve takes n bytes of the connection's buffer budget for this request.
func (r *request) reserve(n int) {
	r.c.budget.acquire(n)
	r.budgeted += n
}

// free returns everything the request holds; r must not be used after.
func (r *request) free() {
	if r.buf != nil {
		putBuf(r.buf)
		r.buf = nil
	}
	r.c.budget.release(r.budgeted)
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
	if r.c.sess != nil && r.c.sess.Structured {
		r.hdr = nbd.AppendErrorChunk(r.hdr[:0], nbd.ReplyFlagDone, r.Cookie, errno, msg)
	} else {
		r.hdr = nbd.AppendSimpleReply(r.hdr[:0], errno, r.Cookie)
	}
	r.segs = append(r.segs[:0], seg{hi: len(r.hdr)})
}

// replyWriter sends replies. There is no writer goroutine: the first worker
// to queue a reply while nobody is writing becomes the writer and keeps
// sending, in one writev per round, everything queued meanwhile. Under load
// replies are batched; alone, a reply is written at once by its own worker.
type replyWriter struct {
	c *conn

	mu      sync.Mutex // guards queue, spare and busy
	queue   []*request
	spare   []*request
	busy    bool
	iov     net.Buffers // owned by the current writer
	failed  bool        // owned by the current writer
	renewAt time.Time   // owned by the current writer: when to push the deadline
}

func (w *replyWriter) send(r *request) {
	w.mu.Lock()
	w.queue = append(w.queue, r)
	if w.busy {
		w.mu.Unlock()
		return
	}
	w.busy = true
	for len(w.queue) > 0 {
		batch := w.queue
		w.queue = w.spare[:0]
		w.mu.Unlock()
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

func (w *replyWriter) write(batch []*request) {
	if w.failed {
		return
	}
	iov := w.iov[:0]
	for _, r := range batch {
		for _, s := range r.segs {
			if s.data {
				iov = append(iov, r.buf[s.lo:s.hi])
			} else {
				iov = append(iov, r.hdr[s.lo:s.hi])
			}
		}
	}
	w.iov = iov
	// Pushing the deadline forward costs a timer update, so do it only
	// when half of it has passed.
	now := time.Now()
	if now.After(w.renewAt) {
		timeout := w.c.srv.cfg.WriteTimeout
		_ = w.c.nc.SetWriteDeadline(now.Add(timeout))
		w.renewAt = now.Add(timeout / 2)
	}
	if _, err := iov.WriteTo(w.c.nc); err != nil {
		w.failed = true
		w.c.log.Warn().Err(err).Msg("writing replies failed; dropping connection")
		// Closing wakes the reader; requests still running finish
		// and their replies are discarded.
		w.c.nc.Close()
	}
	clear(w.iov[:cap(w.iov)])
}
