package server

// This file opens internals to the package's external tests; it is compiled
// only into the test binary.

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
