package mirror

import (
	"sync"
	"sync/atomic"

	"github.com/bits-and-blooms/bitset"
)

// dirtyMap records which blocks of the export must still be copied, one
// bit per block of gran bytes, and which ranges copies are reading or
// sending right now (in flight). A block is taken (its bit cleared and its
// range put in flight) before its data is read, so a write that lands
// while it is being copied marks it again and the next pass copies it once
// more.
type dirtyMap struct {
	size  uint64
	shift uint // log2 of the granularity

	mu     sync.Mutex // guards the fields below
	bits   *bitset.BitSet
	count  uint      // bits set
	cursor uint      // where the current pass takes its next run
	flight []*flight // ranges being copied, in no order
}

type extent struct{ off, len uint64 }

func (e extent) end() uint64 { return e.off + e.len }

// flight is a range being copied and how much of it has been settled.
type flight struct {
	extent
	done atomic.Uint64
}

func newDirtyMap(size uint64, gran uint64) *dirtyMap {
	shift := uint(0)
	for 1<<shift < gran {
		shift++
	}
	n := uint((size + 1<<shift - 1) >> shift)
	return &dirtyMap{size: size, shift: shift, bits: bitset.New(n)}
}

// blocks returns the bit range covering [off, off+length).
func (d *dirtyMap) blocks(off, length uint64) (uint, uint) {
	end := min(off+length, d.size)
	return uint(off >> d.shift), uint((end + 1<<d.shift - 1) >> d.shift)
}

// mark records that [off, off+length) changed.
func (d *dirtyMap) mark(off, length uint64) {
	if length == 0 || off >= d.size {
		return
	}
	lo, hi := d.blocks(off, length)
	d.mu.Lock()
	d.markLocked(lo, hi)
	d.mu.Unlock()
}

func (d *dirtyMap) markLocked(lo, hi uint) {
	d.count += (hi - lo) - d.bits.OnesBetween(lo, hi)
	d.bits.SetRange(lo, hi)
}

// markAll makes every block dirty: a new attempt copies everything.
func (d *dirtyMap) markAll() {
	d.mu.Lock()
	d.markLocked(0, d.bits.Len())
	d.mu.Unlock()
}

// dirtyBytes is how much is left to copy, rounded up to whole blocks.
func (d *dirtyMap) dirtyBytes() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	return min(uint64(d.count)<<d.shift, d.size)
}

// leftBytes is what remains to be copied for the status: the dirty
// blocks and what copies in flight have not settled yet.
func (d *dirtyMap) leftBytes() uint64 {
	d.mu.Lock()
	defer d.mu.Unlock()
	left := min(uint64(d.count)<<d.shift, d.size)
	for _, f := range d.flight {
		left += f.len - min(f.done.Load(), f.len)
	}
	return left
}

// rewind starts a new pass from the beginning of the export.
func (d *dirtyMap) rewind() {
	d.mu.Lock()
	d.cursor = 0
	d.mu.Unlock()
}

// take finds the next dirty run at or after the pass's cursor, at most max
// bytes long, clears it and puts it in flight. It reports false when the
// pass has reached the end of the export.
func (d *dirtyMap) take(max uint64) (*flight, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	lo, ok := d.bits.NextSet(d.cursor)
	if !ok {
		d.cursor = d.bits.Len()
		return nil, false
	}
	hi, ok := d.bits.NextClear(lo)
	if !ok {
		hi = d.bits.Len()
	}
	hi = min(hi, lo+uint(max>>d.shift))
	d.bits.FlipRange(lo, hi) // every bit in [lo, hi) is set
	d.count -= hi - lo
	d.cursor = hi
	f := &flight{extent: extent{off: uint64(lo) << d.shift, len: uint64(hi-lo) << d.shift}}
	f.len = min(f.len, d.size-f.off)
	d.flight = append(d.flight, f)
	return f, true
}

// landed takes e out of flight once its copy reached the destination, or
// failed; a failed copy is marked dirty again.
func (d *dirtyMap) landed(e *flight, ok bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for i, f := range d.flight {
		if f == e {
			d.flight[i] = d.flight[len(d.flight)-1]
			d.flight = d.flight[:len(d.flight)-1]
			break
		}
	}
	if !ok {
		d.markLocked(d.blocks(e.off, e.len))
	}
}

// markUnlessForwarded is the write hook in active mode: it reports whether
// the caller should send [off, off+length) to the destination itself. A
// write that overlaps a copy in flight is marked dirty instead, because
// that copy may have read the data before the write and land after it.
func (d *dirtyMap) markUnlessForwarded(off, length uint64) bool {
	if length == 0 || off >= d.size {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, f := range d.flight {
		if f.off < off+length && off < f.end() {
			d.markLocked(d.blocks(off, length))
			return false
		}
	}
	return true
}
