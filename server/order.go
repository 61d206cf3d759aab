package server

import "sync"

// orderGate keeps overlapping requests in arrival order across every
// connection of the export. A request is admitted once each earlier request
// it conflicts with has finished; two reads never conflict. So a read never
// sees half of an earlier overlapping write, and overlapping writes land in
// the order they arrived, while everything else runs in parallel.
//
// Deadlock cannot arise: a request only ever waits for requests registered
// before it, and the oldest registered request waits for nothing.
//
// Every active span sits in the tree of all spans, and a write also in the
// tree of writes: a write conflicts with whatever overlaps it, a read only
// with the writes that do. Thousands of reads parked behind one stalled
// write thus cost another read nothing. An admission costs O(log n) for n
// spans in flight, plus O(log n) at most per conflict found, where
// scanning a list cost O(n) under the lock that every connection shares.
type orderGate struct {
	mu     sync.Mutex
	trees  [2]*span // roots, indexed by allSpans and writeSpans
	active int
	seq    uint64
	free   *span
}

// The two trees a span can be in; each has its own links in the span.
const (
	allSpans = iota
	writeSpans
)

// span is one registered request's byte range.
type span struct {
	off, end uint64
	write    bool
	// seq orders spans of equal offset, so every span has its own place in
	// a tree and release finds exactly it.
	seq uint64
	// prio is the treap priority: a parent's is at least its children's,
	// which keeps the trees balanced in expectation.
	prio  uint32
	links [2]spanLinks
	next  *span // in the free list
	// done is made on demand by a later conflicting request and closed
	// when this span is released.
	done chan struct{}
	// deps are the done channels of earlier conflicting spans; owned by
	// the registering request until it has waited on them.
	deps []chan struct{}
}

// spanLinks places a span in one tree, ordered by (off, seq); maxEnd is
// the largest end in the subtree it roots, so a search skips subtrees
// that end before the range it looks for.
type spanLinks struct {
	left, right *span
	maxEnd      uint64
}

// register records [off, end) in arrival order and returns its span. The
// caller must call wait before touching the range and release afterwards.
func (g *orderGate) register(off, end uint64, write bool) *span {
	g.mu.Lock()
	s := g.free
	if s != nil {
		g.free = s.next
	} else {
		s = &span{}
	}
	g.seq++
	s.off, s.end, s.write, s.seq = off, end, write, g.seq
	s.prio = treapPriority(g.seq)
	s.next, s.done = nil, nil
	s.deps = s.deps[:0]
	if write {
		s.collect(g.trees[allSpans], allSpans)
		g.trees[writeSpans] = insertSpan(g.trees[writeSpans], s, writeSpans)
	} else {
		s.collect(g.trees[writeSpans], writeSpans)
	}
	g.trees[allSpans] = insertSpan(g.trees[allSpans], s, allSpans)
	g.active++
	g.mu.Unlock()
	return s
}

// collect adds to s.deps every span of tree t under n that overlaps s.
// Every span of the tree the caller picked conflicts with s if it
// overlaps it.
func (s *span) collect(n *span, t int) {
	for n != nil && n.links[t].maxEnd > s.off {
		s.collect(n.links[t].left, t)
		if n.off >= s.end {
			return // n starts at or past s.end, and so does all to its right
		}
		if s.off < n.end {
			if n.done == nil {
				n.done = make(chan struct{})
			}
			s.deps = append(s.deps, n.done)
		}
		n = n.links[t].right
	}
}

// ready reports whether s has nothing to wait for.
func (s *span) ready() bool { return len(s.deps) == 0 }

// wait blocks until every earlier conflicting span was released.
func (s *span) wait() {
	for i, d := range s.deps {
		<-d
		s.deps[i] = nil
	}
	s.deps = s.deps[:0]
}

// release ends s and admits the requests that were waiting for it.
func (g *orderGate) release(s *span) {
	g.mu.Lock()
	g.trees[allSpans] = removeSpan(g.trees[allSpans], s, allSpans)
	if s.write {
		g.trees[writeSpans] = removeSpan(g.trees[writeSpans], s, writeSpans)
	}
	g.active--
	if s.done != nil {
		close(s.done)
	}
	s.done = nil
	s.next = g.free
	g.free = s
	g.mu.Unlock()
}

// pending reports how many spans are registered (for tests and status).
func (g *orderGate) pending() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.active
}

// treapPriority scrambles a sequence number (the splitmix64 finalizer):
// priorities that look random to any pattern of offsets, without a random
// source to lock or seed.
func treapPriority(seq uint64) uint32 {
	z := seq * 0x9e3779b97f4a7c15
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	return uint32(z ^ z>>31)
}

func (s *span) before(o *span) bool {
	return s.off < o.off || s.off == o.off && s.seq < o.seq
}

// fixMaxEnd recomputes n's maxEnd in tree t from its children's.
func fixMaxEnd(n *span, t int) {
	m := n.end
	if l := n.links[t].left; l != nil && l.links[t].maxEnd > m {
		m = l.links[t].maxEnd
	}
	if r := n.links[t].right; r != nil && r.links[t].maxEnd > m {
		m = r.links[t].maxEnd
	}
	n.links[t].maxEnd = m
}

// insertSpan adds s to the tree t rooted at root and returns the new root.
// Only the spans on the path to s gain a subtree member, so their maxEnd
// grows to s.end at most and none needs its children read.
func insertSpan(root, s *span, t int) *span {
	if root == nil {
		s.links[t] = spanLinks{maxEnd: s.end}
		return s
	}
	rl := &root.links[t]
	rl.maxEnd = max(rl.maxEnd, s.end)
	if s.before(root) {
		rl.left = insertSpan(rl.left, s, t)
		if rl.left.prio > root.prio {
			return rotateRight(root, t)
		}
	} else {
		rl.right = insertSpan(rl.right, s, t)
		if rl.right.prio > root.prio {
			return rotateLeft(root, t)
		}
	}
	return root
}

// removeSpan takes s, which must be in it, out of the tree t rooted at
// root and returns the new root.
func removeSpan(root, s *span, t int) *span {
	if root == s {
		return mergeSpans(s.links[t].left, s.links[t].right, t)
	}
	rl := &root.links[t]
	if s.before(root) {
		rl.left = removeSpan(rl.left, s, t)
	} else {
		rl.right = removeSpan(rl.right, s, t)
	}
	// A subtree's maxEnd can only drop if s was what set it.
	if rl.maxEnd == s.end {
		fixMaxEnd(root, t)
	}
	return root
}

// mergeSpans joins two trees, every span of a before every span of b.
func mergeSpans(a, b *span, t int) *span {
	switch {
	case a == nil:
		return b
	case b == nil:
		return a
	case a.prio > b.prio:
		a.links[t].right = mergeSpans(a.links[t].right, b, t)
		fixMaxEnd(a, t)
		return a
	default:
		b.links[t].left = mergeSpans(a, b.links[t].left, t)
		fixMaxEnd(b, t)
		return b
	}
}

// rotateRight lifts n's left child into n's place; the subtree keeps its
// spans, so the lifted child takes over n's maxEnd.
func rotateRight(n *span, t int) *span {
	l := n.links[t].left
	n.links[t].left = l.links[t].right
	l.links[t].right = n
	l.links[t].maxEnd = n.links[t].maxEnd
	fixMaxEnd(n, t)
	return l
}

// rotateLeft lifts n's right child into n's place.
func rotateLeft(n *span, t int) *span {
	r := n.links[t].right
	n.links[t].right = r.links[t].left
	r.links[t].left = n
	r.links[t].maxEnd = n.links[t].maxEnd
	fixMaxEnd(n, t)
	return r
}
