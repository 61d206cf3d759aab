package server

import (
	"sync/atomic"
	"time"

	"github.com/flexnbd/flexnbd/nbd"
)

// LatencyBuckets are the upper bounds of the request latency histograms:
// a cached read answers in tens of microseconds, a FLUSH of a busy disk
// or a request stuck behind a stalled device takes seconds.
var LatencyBuckets = [...]time.Duration{
	10 * time.Microsecond, 25 * time.Microsecond, 50 * time.Microsecond,
	100 * time.Microsecond, 250 * time.Microsecond, 500 * time.Microsecond,
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 50 * time.Millisecond,
	100 * time.Millisecond, 250 * time.Millisecond, 500 * time.Millisecond,
	time.Second, 2500 * time.Millisecond, 5 * time.Second,
}

// commandNames names the counted commands; the last slot takes every
// command number the protocol does not define. DISC has no reply and is
// never counted.
var commandNames = [...]string{
	nbd.CmdRead: "read", nbd.CmdWrite: "write", nbd.CmdDisc: "", nbd.CmdFlush: "flush",
	nbd.CmdTrim: "trim", nbd.CmdCache: "cache", nbd.CmdWriteZeroes: "write_zeroes",
	nbd.CmdBlockStatus: "block_status", nbd.CmdResize: "resize", nbd.CmdResize + 1: "unknown",
}

// errnoNames names the counted error codes, in the order of their slots;
// the last slot takes any other code.
var errnoNames = [...]string{"EPERM", "EIO", "ENOMEM", "EINVAL", "ENOSPC", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN", "other"}

func errnoSlot(e nbd.Errno) int {
	switch e {
	case nbd.EPERM:
		return 0
	case nbd.EIO:
		return 1
	case nbd.ENOMEM:
		return 2
	case nbd.EINVAL:
		return 3
	case nbd.ENOSPC:
		return 4
	case nbd.EOVERFLOW:
		return 5
	case nbd.ENOTSUP:
		return 6
	case nbd.ESHUTDOWN:
		return 7
	}
	return len(errnoNames) - 1
}

// Metrics counts the requests a server answered, for an exporter that
// reads them at any moment (Commands, Errors, GateWaits). Every figure is
// an atomic counter bumped by the request path, which takes no lock and
// allocates nothing for it; a server counts only when Config.Metrics is
// set. The zero value is ready to use.
type Metrics struct {
	commands  [len(commandNames)]commandCounters
	errors    [len(errnoNames)]atomic.Uint64
	gateWaits atomic.Uint64
}

type commandCounters struct {
	bytes     atomic.Uint64
	latencyNs atomic.Uint64
	// buckets counts latencies per LatencyBuckets interval, not
	// cumulatively: one increment per request; the last is +Inf.
	buckets [len(LatencyBuckets) + 1]atomic.Uint64
	// Counters of different commands sit on different cache lines, so
	// connections busy with reads and writes do not contend.
	_ [64]byte
}

// observe counts one answered request of cmd that took d and failed with
// errno (0: success), which covered length bytes.
func (m *Metrics) observe(cmd nbd.Cmd, length uint32, errno nbd.Errno, d time.Duration) {
	slot := int(cmd)
	if slot >= len(commandNames) {
		slot = len(commandNames) - 1
	}
	cc := &m.commands[slot]
	i := 0
	for i < len(LatencyBuckets) && d > LatencyBuckets[i] {
		i++
	}
	cc.buckets[i].Add(1)
	cc.latencyNs.Add(uint64(d))
	if errno != 0 {
		m.errors[errnoSlot(errno)].Add(1)
		return
	}
	cc.bytes.Add(uint64(length))
}

// CommandFigures are one command's counters at one moment.
type CommandFigures struct {
	// Command is the protocol's name in lower case ("read",
	// "write_zeroes"), or "unknown" for numbers it does not define.
	Command string
	// Requests counts the answered requests, failed ones included.
	Requests uint64
	// Bytes is the length of the requests that succeeded.
	Bytes uint64
	// Latency is the total time from reading a request's header to
	// handing its reply to the socket, over Requests requests.
	Latency time.Duration
	// Buckets[i] counts the requests that took at most LatencyBuckets[i]
	// and longer than the bound before it; the extra last entry counts
	// those longer than every bound.
	Buckets [len(LatencyBuckets) + 1]uint64
}

// Commands returns every countable command's figures, DISC excluded.
func (m *Metrics) Commands() []CommandFigures {
	out := make([]CommandFigures, 0, len(commandNames))
	for slot, name := range commandNames {
		if name == "" {
			continue
		}
		cc := &m.commands[slot]
		f := CommandFigures{Command: name, Bytes: cc.bytes.Load(), Latency: time.Duration(cc.latencyNs.Load())}
		for i := range cc.buckets {
			f.Buckets[i] = cc.buckets[i].Load()
			f.Requests += f.Buckets[i]
		}
		out = append(out, f)
	}
	return out
}

// ErrnoCount is how many replies carried one error code.
type ErrnoCount struct {
	Errno string // "EINVAL", ...; "other" for codes outside the specification
	Count uint64
}

// Errors counts the error replies by code, refusals included.
func (m *Metrics) Errors() []ErrnoCount {
	out := make([]ErrnoCount, len(errnoNames))
	for i, name := range errnoNames {
		out[i] = ErrnoCount{Errno: name, Count: m.errors[i].Load()}
	}
	return out
}

// GateWaits counts the requests that had to wait in the ordering gate for
// an earlier overlapping request to finish.
func (m *Metrics) GateWaits() uint64 { return m.gateWaits.Load() }

// noteGateWait counts a request about to wait in the ordering gate, if it
// will: a span registered behind an overlapping one. execute may run a
// request twice (a read that would block); it waits only the first time.
func (s *Server) noteGateWait(sp *span) {
	if m := s.cfg.Metrics; m != nil && !sp.ready() {
		m.gateWaits.Add(1)
	}
}
