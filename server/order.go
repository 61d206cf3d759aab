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
type orderGate struct {
	mu sync.Mutex
	// active spans in registration order
	head, tail *span
	free       *span
}

// span is one registered request's byte range.
type span struct {
	off, end   uint64
	write      bool
	prev, next *span
	// done is made on demand by a later conflicting request and closed
	// when this span is released.
	done chan struct{}
	// deps are the done channels of earlier conflicting spans; owned by
	// the registering request until it has waited on them.
	deps []chan struct{}
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
	s.off, s.end, s.write = off, end, write
	s.next, s.done = nil, nil
	s.deps = s.deps[:0]
	for e := g.head; e != nil; e = e.next {
		if (write || e.write) && e.off < end && off < e.end {
			if e.done == nil {
				e.done = make(chan struct{})
			}
			s.deps = append(s.deps, e.done)
		}
	}
	s.prev = g.tail
	if g.tail != nil {
		g.tail.next = s
	} else {
		g.head = s
	}
	g.tail = s
	g.mu.Unlock()
	return s
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
	if s.prev != nil {
		s.prev.next = s.next
	} else {
		g.head = s.next
	}
	if s.next != nil {
		s.next.prev = s.prev
	} else {
		g.tail = s.prev
	}
	if s.done != nil {
		close(s.done)
	}
	s.prev, s.done = nil, nil
	s.next = g.free
	g.free = s
	g.mu.Unlock()
}

// pending reports how many spans are registered (for tests and status).
func (g *orderGate) pending() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	n := 0
	for e := g.head; e != nil; e = e.next {
		n++
	}
	return n
}
