package server

import (
	"errors"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Turns between connections.
//
// A reader that finds its next request already in its socket runs it and
// goes on without ever blocking: a connection with a burst of cache-hit
// requests does, and so, on a machine whose clients share the server's
// cores, does each of a few connections at QD1, whose client sends the
// next request while the server's thread is still on its way back to
// read. The runtime switches goroutines only when one blocks (or every
// 10 ms, from its monitor), and it looks for goroutines woken by the
// network only when a processor runs out of work. So other connections'
// requests sat in their sockets, or their readers sat in a run queue,
// for milliseconds: an execution trace of 8 connections at QD1 on two
// shared cores showed readers runnable for 2 ms at the 90th percentile,
// while two connections were served in turn with their clients.
//
// So a reader that has run turnQuantum without waiting asks the kernel
// whether other connections have data, wakes those whose readers wait for
// it (up to maxNudges), and, if any other connection has data at all or
// another reader is in a yield (its requests may already be in its buffer,
// where the kernel does not see them), sends its held replies and yields:
// readers already woken then run before it, and on one processor it goes
// to the back of the line. A connection leaves the epoll set when its
// reading ends, so a socket nobody will read again does not count.
//
// The kernel is asked through an epoll set of the server's own holding
// every connection past its handshake (level-triggered, never waited on,
// so it costs an entry per connection and a readiness callback per
// arrival; the kernel rotates what it reports). A waiting reader is woken
// by setting its read deadline to now, which makes the runtime ready it
// at once; the reader tells that wake-up from a real deadline (only
// draining sets one while it waits for a request) by its wait state,
// restores the deadline and reads again. (The runtime wraps that deadline
// error in a new net.OpError: one small allocation per nudge.)

// turnQuantum is how long a reader runs requests without waiting before
// it gives others a turn. Shorter trades throughput for tail latency: on
// two cores shared with the clients, 8 connections at QD1 (4 KiB reads)
// got 1.1-1.2x nbdkit's IOPS with a p99 at or below nbdkit's with 50 µs,
// 1.2-1.35x at about its p99 with 100 µs, 1.3-1.4x at 1.2x its p99 with
// 200 µs, and 1.5x at 2.7x its p99 when turns came every 64 requests and
// yielded only to readers they had woken (docs/DESIGN.md, "Tail latency
// on many connections").
const turnQuantum = 50 * time.Microsecond

// maxNudges bounds how many waiting readers one turn wakes.
const maxNudges = 8

// Reader wait states (conn.waitState).
const (
	running = iota
	waitingForRequest
	nudged
)

// turns is the server's registry of connections that may be given a turn.
type turns struct {
	mu   sync.Mutex
	epfd int // open while ids is not empty
	ids  map[uint64]*conn
	next uint64

	// yielded counts readers in a yield: runnable, and possibly holding
	// requests already read into their buffers, which epoll cannot see.
	yielded atomic.Int32
	// taken counts the turns during which another reader gave one too
	// (Server.stats.Turns moved on), so had run: turns that went to
	// someone.
	taken atomic.Uint64
}

// add registers c, whose handshake is done. Without a file descriptor, or
// without an epoll set, c still works; it just is not nudged.
func (t *turns) add(c *conn) {
	if c.sock == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.ids == nil {
		t.ids = make(map[uint64]*conn)
	}
	if len(t.ids) == 0 {
		fd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
		if err != nil { // out of descriptors, say: the next connection tries again
			c.log.Debug().Err(err).Msg("no epoll set for turns between connections")
			return
		}
		t.epfd = fd
	}
	t.next++
	id := t.next
	ev := unix.EpollEvent{Events: unix.EPOLLIN}
	*(*uint64)(unsafe.Pointer(&ev.Fd)) = id
	var err error
	cerr := c.sock.rc.Control(func(fd uintptr) {
		err = unix.EpollCtl(t.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		c.log.Debug().Err(err).Msg("connection not registered for turns")
		if len(t.ids) == 0 {
			unix.Close(t.epfd)
		}
		return
	}
	c.turnID, c.turnEpfd = id, t.epfd
	t.ids[id] = c
}

// remove forgets c; its descriptor must still be open.
func (t *turns) remove(c *conn) {
	if c.turnID == 0 {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	_ = c.sock.rc.Control(func(fd uintptr) {
		_ = unix.EpollCtl(t.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
	})
	delete(t.ids, c.turnID)
	c.turnID = 0
	if len(t.ids) == 0 {
		unix.Close(t.epfd)
	}
}

// maybeGiveTurns gives a turn when the reader has run turnQuantum since
// it last waited or gave one. The caller reads the clock only with other
// connections open: a single client pays nothing.
func (c *conn) maybeGiveTurns() {
	now := c.srv.clock()
	switch {
	case c.runFrom == 0:
		c.runFrom = now
	case now-c.runFrom > int64(turnQuantum):
		if c.giveTurns() {
			// From after the turn: time in the run queue is not running.
			now = c.srv.clock()
		}
		c.runFrom = now
	}
}

// giveTurns wakes up to maxNudges readers that wait for requests already
// in their sockets and, when any other connection has data or another
// reader is in a yield, yields the processor with c's held replies sent;
// it reports whether it yielded. c must be registered (so the epoll set
// stays open).
func (c *conn) giveTurns() bool {
	t := &c.srv.turns
	evs := &c.turnEvents
	n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(c.turnEpfd), uintptr(unsafe.Pointer(&evs[0])),
		uintptr(len(evs)), 0, 0, 0)
	others := 0
	if errno == 0 && n > 0 {
		woke := 0
		t.mu.Lock()
		for i := range int(n) {
			other := t.ids[*(*uint64)(unsafe.Pointer(&evs[i].Fd))]
			if other == nil || other == c {
				continue
			}
			// A reader that does not wait is running or already in a run
			// queue: the yield below is its turn.
			others++
			if woke < maxNudges && other.nudge() {
				woke++
			}
		}
		t.mu.Unlock()
	}
	if others == 0 && t.yielded.Load() == 0 {
		return false
	}
	seq := c.srv.stats.Turns.Add(1)
	c.out.flush()
	t.yielded.Add(1)
	runtime.Gosched()
	t.yielded.Add(-1)
	if c.srv.stats.Turns.Load() != seq {
		t.taken.Add(1)
	}
	return true
}

// nudge wakes the connection's reader if it waits for a request.
func (c *conn) nudge() bool {
	c.nudgeMu.Lock()
	defer c.nudgeMu.Unlock()
	if !c.waitState.CompareAndSwap(waitingForRequest, nudged) {
		return false
	}
	_ = c.nc.SetReadDeadline(time.Now())
	return true
}

// waited ends a wait for a request. It reports whether the wait was cut
// short by a nudge and not by a real deadline, so the caller should wait
// again.
func (c *conn) waited(err error) (again bool) {
	if c.waitState.Swap(running) != nudged {
		return false
	}
	c.nudgeMu.Lock() // the nudger has set its deadline
	c.nudgeMu.Unlock()
	c.clearReadDeadline()
	return err != nil && errors.Is(err, os.ErrDeadlineExceeded) && !c.draining.Load()
}

// requestStream is what the large reader reads requests from: the socket
// through raw system calls, waiting in a way a turn can cut short.
type requestStream struct{ c *conn }

func (s requestStream) Read(p []byte) (int, error) {
	c := s.c
	for {
		waits := c.sock.ReadWaits()
		c.waitState.Store(waitingForRequest)
		n, err := c.sock.Read(p)
		again := c.waited(err)
		if c.sock.ReadWaits() != waits {
			c.runFrom = 0
		}
		if !again {
			return n, err
		}
	}
}

// waitForRequest waits, without a buffer, until the socket has data; a
// turn can cut it short too.
func (c *conn) waitForRequest() error {
	for {
		c.waitState.Store(waitingForRequest)
		err := c.sock.waitReadable()
		if !c.waited(err) {
			c.runFrom = 0
			return err
		}
	}
}
