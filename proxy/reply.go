package proxy

import (
	"errors"
	"net"

	"github.com/flexnbd/flexnbd/nbd"
)

// Replies with up to inlineReply bytes of data are gathered in out; longer
// ones are written at once with what is gathered. maxQueuedReplies bounds
// out.
const (
	inlineReply      = 32 << 10
	maxQueuedReplies = 256 << 10
)

// answer sends o's reply to the client, once. Replies are gathered and
// written together when the upstream reader has nothing more to hand
// over (flushOut), or at once with flush.
func (c *conn) answer(o *op, ext []nbd.Extent, err error, flush bool) {
	if !o.done.CompareAndSwap(false, true) {
		return
	}
	c.pmu.Lock()
	delete(c.pending, o.seq)
	// A request sent once is referenced by nobody else now; one sent
	// again may still be in a connection's hands.
	recycle := o.sends <= 1
	c.pmu.Unlock()
	if o.change {
		c.cache.changed()
	}
	if o.fetch != 0 && err == nil {
		c.cache.keep(o.pgen, o.req.Offset+uint64(o.req.Length), o.buf[o.req.Length:o.fetch])
	}
	defer func() {
		<-c.slots
		c.unanswered.Done()
	}()
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
	var data []byte
	switch {
	case errno != 0 && c.sess.Structured:
		c.out = nbd.AppendErrorChunk(c.out, nbd.ReplyFlagDone, cookie, errno, msg)
	case errno != 0:
		c.out = nbd.AppendSimpleReply(c.out, errno, cookie)
	case o.req.Type == nbd.CmdRead && c.sess.Structured && o.req.Length == 0:
		c.out = nbd.AppendChunkHeader(c.out, nbd.ReplyFlagDone, nbd.ReplyTypeNone, cookie, 0)
	case o.req.Type == nbd.CmdRead && c.sess.Structured:
		c.out = nbd.AppendOffsetDataHeader(c.out, nbd.ReplyFlagDone, cookie, o.req.Offset, o.req.Length)
		data = o.buf[:o.req.Length]
	case o.req.Type == nbd.CmdRead:
		c.out = nbd.AppendSimpleReply(c.out, 0, cookie)
		data = o.buf[:o.req.Length]
	case o.req.Type == nbd.CmdBlockStatus:
		c.out = nbd.AppendBlockStatus(c.out, nbd.ReplyFlagDone, cookie, c.sess.AllocationContext, ext)
	default:
		c.out = nbd.AppendSimpleReply(c.out, 0, cookie)
	}
	var werr error
	switch {
	case len(data) > inlineReply:
		c.wbufs = append(c.wbufs[:0], c.out, data)
		werr = c.writeBufs(&c.wbufs)
		clear(c.wbufs) // keep no reference to the data buffer
		c.wbufs = c.wbufs[:0]
		c.out = c.out[:0]
	case len(data) > 0:
		c.out = append(c.out, data...)
	}
	if werr == nil && (flush || len(c.out) >= maxQueuedReplies) {
		werr = c.writeOut()
	}
	c.wmu.Unlock()
	if recycle {
		putBuf(o.buf)
		putBuf(o.payload)
	}
	if werr != nil {
		c.log.Debug().Err(werr).Msg("reply not delivered")
		c.abort()
	}
}

// flushOut writes the gathered replies.
func (c *conn) flushOut() {
	c.wmu.Lock()
	err := c.writeOut()
	c.wmu.Unlock()
	if err != nil {
		c.log.Debug().Err(err).Msg("reply not delivered")
		c.abort()
	}
}

// writeOut writes out; the caller holds wmu.
func (c *conn) writeOut() error {
	if len(c.out) == 0 {
		return nil
	}
	var err error
	if c.raw != nil {
		_, err = c.raw.Write(c.out)
	} else {
		_, err = c.nc.Write(c.out)
	}
	c.out = c.out[:0]
	return err
}

// writeBufs writes *bufs to the client and may consume it; the caller
// holds wmu.
func (c *conn) writeBufs(bufs *net.Buffers) error {
	if c.raw != nil {
		_, err := c.raw.Writev(*bufs)
		return err
	}
	_, err := bufs.WriteTo(c.nc)
	return err
}
