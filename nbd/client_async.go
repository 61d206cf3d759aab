package nbd

import (
	"fmt"
	"net"
)

// asyncInline bounds the WRITE payloads StartAsync copies into its queue;
// larger ones are sent at once, after what is queued.
const asyncInline = 16 << 10

// StartAsync sends req without waiting for its reply and calls done with
// the outcome on the client's reply reader goroutine, as Do would return
// it (an error that is not an Errno or *ServerError means the connection
// failed; every outstanding call then gets it). done must not block for
// long: replies wait behind it. readBuf must stay untouched until done.
//
// Small requests are only queued: FlushRequests sends what is queued, so
// that a caller with several requests at hand sends them in one system
// call. The queue is also sent before any other request. StartAsync waits
// while MaxInFlight requests are outstanding. It has no timeout of its
// own: a caller that gives up on a reply closes the client (Abort).
func (c *Client) StartAsync(req Request, payload, readBuf []byte, done func([]Extent, error)) error {
	if req.Type == CmdRead && len(readBuf) != int(req.Length) {
		return fmt.Errorf("nbd: read buffer of %d bytes for a %d-byte read", len(readBuf), req.Length)
	}
	if req.Type == CmdDisc {
		return fmt.Errorf("nbd: use Close to disconnect")
	}
	select {
	case c.sem <- struct{}{}:
	default:
		// Every slot is taken, possibly by requests still queued here:
		// send them, or no reply would ever free a slot.
		_ = c.FlushRequests()
		c.sem <- struct{}{}
	}
	cl := getCall()
	cl.req, cl.buf, cl.fn = req, readBuf, done
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		putCall(cl)
		<-c.sem
		return err
	}
	cl.req.Cookie = c.nextCookie
	c.nextCookie++
	c.pending[cl.req.Cookie] = cl
	c.mu.Unlock()

	c.wmu.Lock()
	c.queued = AppendRequest(c.queued, cl.req)
	var err error
	if req.Type == CmdWrite && len(payload) > 0 {
		if len(payload) <= asyncInline {
			c.queued = append(c.queued, payload...)
		} else {
			bufs := net.Buffers{c.queued, payload}
			err = c.writeBufs(&bufs)
			c.queued = c.queued[:0]
		}
	}
	c.wmu.Unlock()
	if err != nil {
		c.fail(fmt.Errorf("nbd: send request: %w", err))
	}
	return nil
}

// FlushRequests sends the requests StartAsync queued.
func (c *Client) FlushRequests() error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if len(c.queued) == 0 {
		return nil
	}
	err := c.write(c.queued)
	c.queued = c.queued[:0]
	if err != nil {
		err = fmt.Errorf("nbd: send request: %w", err)
		go c.fail(err) // fail waits for the reader, which may be calling us
	}
	return err
}

// complete ends a call whose reply is in, or whose connection is gone:
// Do's waiter is woken, or StartAsync's callback runs and the call's slot
// is released.
func (c *Client) complete(cl *call) {
	if cl.fn == nil {
		cl.done <- struct{}{}
		return
	}
	var err error
	switch {
	case cl.errno == errConnLost:
		err = c.Err()
	case cl.errno != 0 && cl.msg != "":
		err = &ServerError{Code: cl.errno, Message: cl.msg}
	case cl.errno != 0:
		err = cl.errno
	}
	fn, ext := cl.fn, cl.extents
	putCall(cl)
	<-c.sem
	fn(ext, err)
}
