package proxy

import "sync"

// prefetch is the C flexnbd-proxy's read-ahead (--cache): a READ of at
// most half the buffer fetches twice its length, answers the first half
// and keeps the second, which answers the next READ if it asks for exactly
// that. Any change to the export (WRITE, TRIM, WRITE_ZEROES) and any
// reconnection throws it away, and a read-ahead is only made, and only
// kept, when no change was in flight from its send to its reply: a server
// may run overlapping requests in any order, so data read beside an
// unanswered write could predate it.
type prefetch struct {
	size int // bytes; 0 turns it off

	mu      sync.Mutex
	gen     uint64 // bumped by every change and reconnection
	changes int    // changes in flight
	from    uint64
	data    []byte // the kept half; empty when there is none
}

// hit answers a READ of [off, off+n) into p from the kept data, which is
// then used up.
func (f *prefetch) hit(off uint64, p []byte) bool {
	if f.size == 0 {
		return false
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.data) == 0 || off != f.from || len(p) > len(f.data) {
		return false
	}
	copy(p, f.data)
	f.data = f.data[:0]
	return true
}

// plan reports whether a READ of n bytes at off should fetch 2n, and the
// generation to present with its reply.
func (f *prefetch) plan(off uint64, n uint32, exportSize uint64) (bool, uint64) {
	if f.size == 0 || n == 0 || 2*uint64(n) > uint64(f.size) || off+2*uint64(n) > exportSize {
		return false, 0
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.changes == 0, f.gen
}

// keep stores the second half of a doubled READ, unless anything changed
// since it was sent.
func (f *prefetch) keep(gen, from uint64, p []byte) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if gen != f.gen || f.changes != 0 {
		return
	}
	if cap(f.data) < len(p) {
		f.data = make([]byte, 0, f.size)
	}
	f.data = append(f.data[:0], p...)
	f.from = from
}

// change is called when a change is sent, changed when it is answered.
func (f *prefetch) change() {
	if f.size == 0 {
		return
	}
	f.mu.Lock()
	f.gen++
	f.changes++
	f.data = f.data[:0]
	f.mu.Unlock()
}

func (f *prefetch) changed() {
	if f.size == 0 {
		return
	}
	f.mu.Lock()
	f.changes--
	f.mu.Unlock()
}

// forget drops the kept data and any read-ahead in flight.
func (f *prefetch) forget() {
	if f.size == 0 {
		return
	}
	f.mu.Lock()
	f.gen++
	f.data = f.data[:0]
	f.mu.Unlock()
}
