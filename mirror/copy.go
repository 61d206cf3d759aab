package mirror

import (
	"context"
	"fmt"
	"sync/atomic"

	"github.com/flexnbd/flexnbd/nbd"
)

// maxZeroRequest bounds one WRITE_ZEROES: the length field has 32 bits,
// and some servers bound what they zero at once.
const maxZeroRequest = 1 << 30

// run is a stretch of the export that is all data or all hole.
type run struct {
	off, len uint64
	hole     bool
}

// copyExtent sends e as the source holds it now: data runs as WRITEs,
// holes as WRITE_ZEROES (or nothing where the destination already reads
// zeroes, which only the first pass asks about), or as zero data to a
// destination without WRITE_ZEROES. limited paces the sends by the speed
// limit. Bytes settled are added to progress, when given, as they land.
func (a *attempt) copyExtent(ctx context.Context, e extent, progress *atomic.Uint64, firstPass, limited bool) error {
	var runs []run
	err := a.m.cfg.Export.Extents(e.off, e.len, func(off, n uint64, hole bool) bool {
		if k := len(runs); k > 0 && runs[k-1].hole == hole {
			runs[k-1].len += n
		} else {
			runs = append(runs, run{off, n, hole})
		}
		return true
	})
	if err != nil {
		return fmt.Errorf("mirror: source extents: %w", err)
	}
	for _, r := range runs {
		if r.hole {
			err = a.copyHole(ctx, r.off, r.len, firstPass, limited)
			if err == nil {
				a.settle(progress, r.len)
			}
		} else {
			err = a.copyData(ctx, r.off, r.len, progress, limited)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// settle counts n bytes of a pass as done, for the status.
func (a *attempt) settle(progress *atomic.Uint64, n uint64) {
	if progress != nil {
		progress.Add(n)
		a.m.settled.Add(n)
	}
}

// copyData sends [off, off+n) in WRITEs of at most one chunk, with their
// payload taken from the source file by the kernel where it can.
func (a *attempt) copyData(ctx context.Context, off, n uint64, progress *atomic.Uint64, limited bool) error {
	chunk := a.m.cfg.ChunkSize
	if a.file != nil {
		for n > 0 {
			k := min(n, chunk)
			err := a.send(ctx, off, k, limited, func(rctx context.Context) error {
				return a.c.WriteFile(rctx, a.file, int64(off), uint32(k), off, 0)
			})
			if err != nil {
				return err
			}
			a.settle(progress, k)
			off += k
			n -= k
		}
		return nil
	}
	bp := a.m.getBuf()
	defer a.m.bufs.Put(bp)
	for n > 0 {
		k := min(n, chunk)
		buf := (*bp)[:k]
		if err := a.m.cfg.Export.ReadAt(buf, off); err != nil {
			return fmt.Errorf("mirror: read source at %d: %w", off, err)
		}
		if err := a.write(ctx, buf, off, limited); err != nil {
			return err
		}
		a.settle(progress, k)
		off += k
		n -= k
	}
	return nil
}

// write sends one WRITE of p and waits for its reply.
func (a *attempt) write(ctx context.Context, p []byte, off uint64, limited bool) error {
	return a.send(ctx, off, uint64(len(p)), limited, func(rctx context.Context) error {
		return a.c.Write(rctx, p, off, 0)
	})
}

// send runs one WRITE of n bytes at off through do, paced by the speed
// limit when limited, and counts it for the background flusher.
func (a *attempt) send(ctx context.Context, off, n uint64, limited bool, do func(context.Context) error) error {
	if limited {
		if err := a.m.lim.wait(ctx, n); err != nil {
			return err
		}
	}
	rctx, cancel := context.WithTimeout(ctx, a.m.cfg.RequestTimeout)
	defer cancel()
	if err := do(rctx); err != nil {
		return fmt.Errorf("mirror: write %d bytes at %d: %w", n, off, err)
	}
	a.m.sent.Add(n)
	if a.unflushed.Add(n) >= flushEvery {
		select {
		case a.flushKick <- struct{}{}:
		default:
		}
	}
	return nil
}

// copyHole makes [off, off+n) read as zeroes on the destination.
func (a *attempt) copyHole(ctx context.Context, off, n uint64, firstPass, limited bool) error {
	if !a.zeroes {
		return a.writeZeroData(ctx, off, n, limited)
	}
	if !firstPass || !a.blockStatus {
		return a.writeZeroes(ctx, off, n)
	}
	// The first pass meets every hole of the source, and a new
	// destination is mostly holes itself: ask before zeroing.
	end := off + n
	for off < end {
		q := uint32(min(end-off, maxZeroRequest))
		rctx, cancel := context.WithTimeout(ctx, a.m.cfg.RequestTimeout)
		exts, err := a.c.BlockStatus(rctx, off, q, 0)
		cancel()
		if err != nil {
			return fmt.Errorf("mirror: destination block status at %d: %w", off, err)
		}
		if len(exts) == 0 {
			return fmt.Errorf("mirror: destination block status at %d: no extents", off)
		}
		for _, x := range exts {
			k := min(uint64(x.Length), end-off)
			if x.Flags&nbd.StateZero == 0 {
				if err := a.writeZeroes(ctx, off, k); err != nil {
					return err
				}
			}
			off += k
			if off >= end {
				break
			}
		}
	}
	return nil
}

func (a *attempt) writeZeroes(ctx context.Context, off, n uint64) error {
	for n > 0 {
		k := min(n, maxZeroRequest)
		rctx, cancel := context.WithTimeout(ctx, a.m.cfg.RequestTimeout)
		err := a.c.WriteZeroes(rctx, off, uint32(k), 0)
		cancel()
		if err != nil {
			return fmt.Errorf("mirror: write zeroes %d bytes at %d: %w", k, off, err)
		}
		off += k
		n -= k
	}
	return nil
}

// writeZeroData zeroes a range of a destination that has no WRITE_ZEROES
// (the C flexnbd's listen): its receiver keeps zero blocks sparse.
func (a *attempt) writeZeroData(ctx context.Context, off, n uint64, limited bool) error {
	zero := a.m.zeroChunk()
	for n > 0 {
		k := min(n, uint64(len(zero)))
		if err := a.write(ctx, zero[:k], off, limited); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// getBuf hands out a chunk-sized copy buffer; put it back in m.bufs.
func (m *Mirror) getBuf() *[]byte {
	if p, ok := m.bufs.Get().(*[]byte); ok {
		return p
	}
	b := make([]byte, m.cfg.ChunkSize)
	return &b
}

// zeroChunk is a chunk of zeroes, made once and only read.
func (m *Mirror) zeroChunk() []byte {
	m.zeroOnce.Do(func() { m.zeroes = make([]byte, m.cfg.ChunkSize) })
	return m.zeroes
}
