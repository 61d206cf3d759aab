package nbd

import (
	"encoding/binary"
	"fmt"
	"io"
)

func (c *Client) readLoop() {
	err := c.readReplies()
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	pending := c.pending
	c.pending = nil // Do checks c.err before adding, so this stays unused
	c.mu.Unlock()
	_ = c.conn.Close()
	for _, cl := range pending {
		cl.errno = errConnLost
		c.complete(cl)
	}
	if c.onIdle != nil {
		// Replies handled just before the end may be waiting for it.
		c.onIdle()
	}
	close(c.readerDone)
}

func (c *Client) readReplies() error {
	var hb [ChunkHeaderSize]byte
	for {
		if c.onIdle != nil && c.br.Buffered() == 0 {
			c.onIdle()
		}
		if _, err := io.ReadFull(c.br, hb[:4]); err != nil {
			return fmt.Errorf("nbd: read reply: %w", err)
		}
		n := ReplyMagicKind(hb[:4])
		if n == 0 {
			return protocolErrorf("bad reply magic %#08x", binary.BigEndian.Uint32(hb[:4]))
		}
		if _, err := io.ReadFull(c.br, hb[4:n]); err != nil {
			return fmt.Errorf("nbd: read reply: %w", err)
		}
		h, err := DecodeReplyHeader(hb[:n])
		if err != nil {
			return err
		}
		c.mu.Lock()
		cl := c.pending[h.Cookie]
		c.mu.Unlock()
		if cl == nil {
			return protocolErrorf("reply for unknown cookie %d", h.Cookie)
		}
		if h.Structured {
			err = c.readChunk(&h, cl)
		} else {
			err = c.readSimple(&h, cl)
		}
		if err != nil {
			return err
		}
		if h.Done() && h.Structured && cl.req.Type == CmdRead && cl.errno == 0 && cl.covered != uint64(cl.req.Length) {
			// Bytes no chunk described would be handed back as
			// whatever the buffer held: refuse to call that success.
			return protocolErrorf("read reply described %d of %d bytes", cl.covered, cl.req.Length)
		}
		if h.Done() {
			c.mu.Lock()
			delete(c.pending, h.Cookie)
			c.mu.Unlock()
			c.complete(cl)
		}
	}
}

func (c *Client) readSimple(h *ReplyHeader, cl *call) error {
	cl.errno = h.Errno
	if cl.req.Type == CmdRead && h.Errno == 0 {
		if _, err := io.ReadFull(c.br, cl.buf); err != nil {
			return fmt.Errorf("nbd: read reply data: %w", err)
		}
	}
	return nil
}

func (c *Client) readChunk(h *ReplyHeader, cl *call) error {
	switch h.Type {
	case ReplyTypeNone:
		if h.Length != 0 {
			return protocolErrorf("NONE chunk with %d bytes", h.Length)
		}
		return nil
	case ReplyTypeOffsetData, ReplyTypeOffsetHole:
		return c.readContent(h, cl)
	}
	if h.Length > maxChunkMeta {
		return protocolErrorf("chunk type %d of %d bytes", h.Type, h.Length)
	}
	data := make([]byte, h.Length)
	if _, err := io.ReadFull(c.br, data); err != nil {
		return fmt.Errorf("nbd: read reply chunk: %w", err)
	}
	switch {
	case h.Type == ReplyTypeBlockStatus:
		if cl.req.Type != CmdBlockStatus || len(data) < 12 || (len(data)-4)%8 != 0 {
			return protocolErrorf("malformed block status chunk of %d bytes", len(data))
		}
		if binary.BigEndian.Uint32(data) == c.sess.AllocationContext {
			for d := data[4:]; len(d) >= 8; d = d[8:] {
				cl.extents = append(cl.extents, Extent{
					Length: binary.BigEndian.Uint32(d),
					Flags:  binary.BigEndian.Uint32(d[4:]),
				})
			}
		}
	case h.Type.IsError():
		if len(data) < 6 {
			return protocolErrorf("error chunk of %d bytes", len(data))
		}
		errno := Errno(binary.BigEndian.Uint32(data))
		msgLen := int(binary.BigEndian.Uint16(data[4:6]))
		if msgLen > len(data)-6 {
			return protocolErrorf("error message overruns its chunk")
		}
		if errno == 0 || errno == errConnLost {
			errno = EINVAL // the spec's advice for nonsense codes
		}
		if cl.errno == 0 {
			cl.errno = errno
			cl.msg = string(data[6 : 6+msgLen])
		}
	default:
		return protocolErrorf("unknown chunk type %d", h.Type)
	}
	return nil
}

// readContent handles OFFSET_DATA and OFFSET_HOLE, checking that they fall
// inside the request before touching the caller's buffer.
func (c *Client) readContent(h *ReplyHeader, cl *call) error {
	if cl.req.Type != CmdRead {
		return protocolErrorf("content chunk for a non-read request")
	}
	b := &c.chunkScratch
	want := 8
	if h.Type == ReplyTypeOffsetHole {
		want = 12
		if h.Length != 12 {
			return protocolErrorf("hole chunk of %d bytes", h.Length)
		}
	} else if h.Length < 9 {
		return protocolErrorf("data chunk of %d bytes", h.Length)
	}
	if _, err := io.ReadFull(c.br, b[:want]); err != nil {
		return fmt.Errorf("nbd: read reply chunk: %w", err)
	}
	off := binary.BigEndian.Uint64(b[:8])
	n := uint64(h.Length) - 8
	if h.Type == ReplyTypeOffsetHole {
		n = uint64(binary.BigEndian.Uint32(b[8:12]))
	}
	if off < cl.req.Offset || n > uint64(cl.req.Length) || off-cl.req.Offset > uint64(cl.req.Length)-n {
		return protocolErrorf("content chunk [%d,+%d) outside request [%d,+%d)", off, n, cl.req.Offset, cl.req.Length)
	}
	cl.covered += n
	dst := cl.buf[off-cl.req.Offset : off-cl.req.Offset+n]
	if h.Type == ReplyTypeOffsetHole {
		clear(dst)
		return nil
	}
	if _, err := io.ReadFull(c.br, dst); err != nil {
		return fmt.Errorf("nbd: read reply data: %w", err)
	}
	return nil
}
