package server

import "fmt"

// This file opens internals to the package's external tests; it is compiled
// only into the test binary.

// TurnsTaken counts the turns during which another reader gave a turn
// too, so had run: the turns that went to someone.
func (s *Server) TurnsTaken() uint64 { return s.turns.taken.Load() }

// OrderGate is the ordering gate, for unit tests of its admission rules.
type OrderGate struct{ g orderGate }

// GateSpan is one request registered with an OrderGate.
type GateSpan struct{ s *span }

// Register records [off, end) as the next request in arrival order.
func (g *OrderGate) Register(off, end uint64, write bool) GateSpan {
	return GateSpan{g.g.register(off, end, write)}
}

// Release ends s, admitting the requests that waited for it.
func (g *OrderGate) Release(s GateSpan) { g.g.release(s.s) }

// Pending counts the registered spans.
func (g *OrderGate) Pending() int { return g.g.pending() }

// Ready reports whether s may run without waiting.
func (s GateSpan) Ready() bool { return s.s.ready() }

// Wait blocks until every earlier conflicting span was released.
func (s GateSpan) Wait() { s.s.wait() }

// GatePending counts the requests registered with the server's gate: zero
// once every request was answered, or a span leaked.
func (s *Server) GatePending() int { return s.gate.pending() }

// BufferBytesInUse sums the data-buffer budget taken by every connection.
func (s *Server) BufferBytesInUse() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.conns {
		n += c.budget.holding()
	}
	return n
}

// DrainingClients counts connections told to finish and close.
func (s *Server) DrainingClients() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for c := range s.conns {
		if c.draining.Load() {
			n++
		}
	}
	return n
}

// MemoryInUse is what the server-wide budget has handed out.
func (s *Server) MemoryInUse() int {
	return s.memory.holding()
}

// DependsOn reports whether s waits for o, which must still be registered.
func (s GateSpan) DependsOn(o GateSpan) bool {
	for _, d := range s.s.deps {
		if d != nil && d == o.s.done {
			return true
		}
	}
	return false
}

// Deps counts the earlier spans s waits for.
func (s GateSpan) Deps() int { return len(s.s.deps) }

// Admitted reports, without blocking, whether every span s waits for was
// released.
func (s GateSpan) Admitted() bool {
	for _, d := range s.s.deps {
		select {
		case <-d:
		default:
			return false
		}
	}
	return true
}

// CheckTrees returns what breaks the gate's tree invariants, if anything:
// order by (offset, registration), heap order of priorities, each maxEnd
// exact, and exactly the registered spans (writes) in the tree of all
// spans (of writes).
func (g *OrderGate) CheckTrees() error {
	g.g.mu.Lock()
	defer g.g.mu.Unlock()
	var count [2]int
	var walk func(n *span, t int, lo, hi *span) (uint64, error)
	walk = func(n *span, t int, lo, hi *span) (uint64, error) {
		if n == nil {
			return 0, nil
		}
		count[t]++
		if t == writeSpans && !n.write {
			return 0, fmt.Errorf("read [%d,%d) in the tree of writes", n.off, n.end)
		}
		if lo != nil && !lo.before(n) || hi != nil && !n.before(hi) {
			return 0, fmt.Errorf("tree %d: [%d,%d) out of order", t, n.off, n.end)
		}
		m := n.end
		for _, c := range []*span{n.links[t].left, n.links[t].right} {
			if c != nil && c.prio > n.prio {
				return 0, fmt.Errorf("tree %d: child priority above its parent's", t)
			}
		}
		l, err := walk(n.links[t].left, t, lo, n)
		if err != nil {
			return 0, err
		}
		r, err := walk(n.links[t].right, t, n, hi)
		if err != nil {
			return 0, err
		}
		m = max(m, l, r)
		if n.links[t].maxEnd != m {
			return 0, fmt.Errorf("tree %d: maxEnd %d, want %d", t, n.links[t].maxEnd, m)
		}
		return m, nil
	}
	writes := 0
	for t := range g.g.trees {
		if _, err := walk(g.g.trees[t], t, nil, nil); err != nil {
			return err
		}
	}
	var countWrites func(n *span)
	countWrites = func(n *span) {
		if n != nil {
			if n.write {
				writes++
			}
			countWrites(n.links[allSpans].left)
			countWrites(n.links[allSpans].right)
		}
	}
	countWrites(g.g.trees[allSpans])
	if count[allSpans] != g.g.active || count[writeSpans] != writes {
		return fmt.Errorf("%d spans in the tree of all (want %d), %d in the tree of writes (want %d)",
			count[allSpans], g.g.active, count[writeSpans], writes)
	}
	return nil
}
