package server

import (
	"github.com/flexnbd/flexnbd/nbd"
)

// validate decides whether a request may run, without touching the
// export. It returns the errno to refuse it with, and a message for logs
// and structured error chunks.
func (c *conn) validate(r *nbd.Request) (nbd.Errno, string) {
	allowed := nbd.CmdFlagFUA // valid on every command once SEND_FUA is set
	switch r.Type {
	case nbd.CmdRead:
		if c.sess.Structured {
			allowed |= nbd.CmdFlagDF
		}
	case nbd.CmdWrite, nbd.CmdFlush, nbd.CmdTrim, nbd.CmdCache:
	case nbd.CmdWriteZeroes:
		allowed |= nbd.CmdFlagNoHole | nbd.CmdFlagFastZero
	case nbd.CmdBlockStatus:
		allowed |= nbd.CmdFlagReqOne
		if c.sess.AllocationContext == 0 {
			return nbd.EINVAL, "block status without a negotiated metadata context"
		}
	default:
		return nbd.EINVAL, "unknown command"
	}
	if r.Flags&^allowed != 0 {
		return nbd.EINVAL, "unsupported command flags"
	}
	isWrite := r.Type == nbd.CmdWrite || r.Type == nbd.CmdTrim || r.Type == nbd.CmdWriteZeroes
	if isWrite && c.srv.cfg.ReadOnly {
		return nbd.EPERM, "export is read-only"
	}
	if r.Type == nbd.CmdFlush {
		return 0, ""
	}
	end, ok := r.End()
	if !ok || end > c.size {
		switch {
		case c.sess.Oldstyle:
			return nbd.ENOSPC, "request beyond the end of the export"
		case r.Type == nbd.CmdWrite || r.Type == nbd.CmdWriteZeroes:
			return nbd.ENOSPC, "write beyond the end of the export"
		}
		return nbd.EINVAL, "request beyond the end of the export"
	}
	if r.Length > c.maxPayload && (r.Type == nbd.CmdRead || r.Type == nbd.CmdWrite && !c.sess.Oldstyle) {
		return nbd.EINVAL, "request larger than the maximum block size"
	}
	if r.Type == nbd.CmdBlockStatus && r.Length == 0 {
		return nbd.EINVAL, "block status of an empty range"
	}
	return 0, ""
}

// maxReadRuns bounds how finely a read is split into data and hole chunks;
// what lies beyond is sent as data, which is always correct.
const maxReadRuns = 64

func (c *conn) handleRead(r *request, nowait bool) error {
	be := c.srv.cfg.Backend
	n := int(r.Length)
	if !c.sess.Structured {
		if r.buf == nil { // a retry after ErrWouldBlock keeps its buffer
			r.allocBuf(n)
		}
		if err := be.ReadAt(r.buf, r.Offset, nowait); err != nil {
			return err
		}
		r.hdr = nbd.AppendSimpleReply(r.hdr[:0], 0, r.Cookie)
		r.addHdr(0)
		r.addData(0, n)
		c.srv.stats.BytesRead.Add(uint64(n))
		return nil
	}
	if n == 0 {
		r.hdr = nbd.AppendChunkHeader(r.hdr[:0], nbd.ReplyFlagDone, nbd.ReplyTypeNone, r.Cookie, 0)
		r.addHdr(0)
		return nil
	}

	// Find the holes first, so that a read of nothing but hole needs no
	// buffer at all. DF asks for one chunk, which must then carry zeroes.
	r.runs = r.runs[:0]
	if r.Flags&nbd.CmdFlagDF == 0 && be.MayHaveHoles() {
		if err := be.Extents(r.Offset, uint64(n), r.addRunFn); err != nil {
			return err
		}
	}
	if len(r.runs) == 0 {
		r.runs = append(r.runs, run{r.Offset, uint64(n), false})
	}
	runs := r.runs

	r.hdr = r.hdr[:0]
	lastFlags := -1 // index in hdr of the final chunk's flags
	for _, ru := range runs {
		mark := len(r.hdr)
		lastFlags = mark + 4
		if ru.hole {
			r.hdr = nbd.AppendOffsetHole(r.hdr, 0, r.Cookie, ru.off, uint32(ru.len))
			r.addHdr(mark)
			continue
		}
		if r.buf == nil {
			r.allocBuf(n)
		}
		lo := int(ru.off - r.Offset)
		hi := lo + int(ru.len)
		if err := be.ReadAt(r.buf[lo:hi], ru.off, nowait); err != nil {
			r.segs = r.segs[:0]
			return err
		}
		r.hdr = nbd.AppendOffsetDataHeader(r.hdr, 0, r.Cookie, ru.off, uint32(ru.len))
		r.addHdr(mark)
		r.addData(lo, hi)
	}
	// Every chunk was read before any is sent, so the last one can carry
	// DONE: no error can follow it.
	r.hdr[lastFlags+1] |= byte(nbd.ReplyFlagDone)
	c.srv.stats.BytesRead.Add(uint64(n))
	return nil
}

func (c *conn) handleWrite(r *request) error {
	err := c.srv.cfg.Backend.WriteAt(r.buf, r.Offset, r.Flags&nbd.CmdFlagFUA != 0)
	// A write that failed may still have changed part of its range.
	c.srv.notifyWrite(r.Offset, uint64(r.Length))
	if err != nil {
		return err
	}
	c.srv.stats.BytesWritten.Add(uint64(r.Length))
	r.setOK()
	return nil
}

func (c *conn) handleFlush(r *request) error {
	if err := c.srv.cfg.Backend.Sync(); err != nil {
		return err
	}
	for {
		seen := c.flushedSeq.Load()
		if seen >= r.seq || c.flushedSeq.CompareAndSwap(seen, r.seq) {
			break
		}
	}
	r.setOK()
	return nil
}

func (c *conn) handleTrim(r *request) error {
	if err := c.srv.cfg.Backend.Trim(r.Offset, uint64(r.Length)); err != nil {
		c.srv.notifyWrite(r.Offset, uint64(r.Length))
		return err
	}
	return c.changed(r)
}

func (c *conn) handleWriteZeroes(r *request) error {
	noHole := r.Flags&nbd.CmdFlagNoHole != 0
	fast := r.Flags&nbd.CmdFlagFastZero != 0
	if err := c.srv.cfg.Backend.Zero(r.Offset, uint64(r.Length), noHole, fast); err != nil {
		c.srv.notifyWrite(r.Offset, uint64(r.Length))
		return err
	}
	return c.changed(r)
}

// changed completes a request that changed the export without a payload:
// the write hook sees it, and FUA makes it durable before the reply.
func (c *conn) changed(r *request) error {
	c.srv.notifyWrite(r.Offset, uint64(r.Length))
	if r.Flags&nbd.CmdFlagFUA != 0 {
		if err := c.srv.cfg.Backend.Sync(); err != nil {
			return err
		}
	}
	r.setOK()
	return nil
}

func (c *conn) handleCache(r *request) error {
	if err := c.srv.cfg.Backend.Cache(r.Offset, uint64(r.Length)); err != nil {
		return err
	}
	r.setOK()
	return nil
}

// maxStatusExtents bounds one block status reply; clients ask again from
// where it ends.
const maxStatusExtents = 1024

func (c *conn) handleBlockStatus(r *request) error {
	limit := maxStatusExtents
	if r.Flags&nbd.CmdFlagReqOne != 0 {
		limit = 1
	}
	r.exts = r.exts[:0]
	r.extLimit = limit
	if err := c.srv.cfg.Backend.Extents(r.Offset, uint64(r.Length), r.addExtentFn); err != nil {
		return err
	}
	exts := r.exts
	r.hdr = nbd.AppendBlockStatus(r.hdr[:0], nbd.ReplyFlagDone, r.Cookie, c.sess.AllocationContext, exts)
	r.addHdr(0)
	return nil
}

// addRun collects a READ's data and hole runs; past maxReadRuns the rest
// of the request is one data run, which is always correct.
func (r *request) addRun(off, length uint64, hole bool) bool {
	if len(r.runs) == maxReadRuns-1 {
		r.runs = append(r.runs, run{off, r.Offset + uint64(r.Length) - off, false})
		return false
	}
	r.runs = append(r.runs, run{off, length, hole})
	return true
}

// addExtent collects BLOCK_STATUS descriptors, merging runs of equal
// status, up to extLimit descriptors.
func (r *request) addExtent(_, length uint64, hole bool) bool {
	var flags uint32
	if hole {
		flags = nbd.StateHole | nbd.StateZero
	}
	if k := len(r.exts); k > 0 && r.exts[k-1].Flags == flags {
		r.exts[k-1].Length += uint32(length) // runs never exceed the request
		return true
	}
	if len(r.exts) == r.extLimit {
		return false
	}
	r.exts = append(r.exts, nbd.Extent{Length: uint32(length), Flags: flags})
	return true
}

func (s *Server) notifyWrite(off, length uint64) {
	if h := s.writeHook.Load(); h != nil {
		(*h)(off, length)
	}
}
