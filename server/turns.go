package server

import (
	"errors"
	"os"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Turns between connections.
//
// A reader that finds its next request already buffered runs it and goes
// on without ever blocking, and the runtime looks for goroutines woken by
// the network only when a processor runs out of work (or every 10 ms from
// its monitor). A connection with a long burst of cache-hit requests so
// kept every processor busy while other connections' requests sat in
// their sockets, their readers parked, for up to a scheduler time slice.
// So a reader that has run turnAfter requests without waiting asks the
// kernel which other connections have data while their readers wait, and
// wakes those readers itself before it yields: each of them gets a turn
// per turnAfter requests of the burst instead of one per time slice.
//
// The kernel is asked through an epoll set of its own holding every
// connection past its handshake (level-triggered, never waited on, so it
// costs an entry per connection and a readiness callback per arrival).
// A waiting reader is woken by setting its read deadline to now, which
// makes the runtime ready it at once; the reader tells that wake-up from a
// real deadline (only draining sets one while it waits for a request) by
// its wait state, restores the deadline and reads again. (The runtime
// wraps that deadline error in a new net.OpError: one small allocation
// per nudge, at most one nudge per turnAfter requests of a burst.)

// turnAfter is how many requests a reader runs without waiting before it
// looks for others waiting: a system call per turnAfter requests.
const turnAfter = 64

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

// giveTurns wakes up to maxNudges readers that wait for requests already
// in their sockets, then yields the processor to them with c's held
// replies sent. c must be registered (so the epoll set stays open).
func (c *conn) giveTurns() {
	t := &c.srv.turns
	if c.turnID == 0 {
		return
	}
	evs := &c.turnEvents
	n, _, errno := unix.RawSyscall6(unix.SYS_EPOLL_PWAIT, uintptr(c.turnEpfd), uintptr(unsafe.Pointer(&evs[0])),
		uintptr(len(evs)), 0, 0, 0)
	if errno != 0 || n == 0 {
		return
	}
	woke := 0
	t.mu.Lock()
	for i := range int(n) {
		other := t.ids[*(*uint64)(unsafe.Pointer(&evs[i].Fd))]
		if other != nil && other != c && other.nudge() {
			woke++
			if woke == maxNudges {
				break
			}
		}
	}
	t.mu.Unlock()
	if woke > 0 {
		c.srv.stats.Turns.Add(1)
		c.out.flush()
		runtime.Gosched()
	}
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
			c.sinceWait = 0
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
			c.sinceWait = 0
			return err
		}
	}
}
