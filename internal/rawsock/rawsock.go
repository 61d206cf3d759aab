// Package rawsock reads and writes a socket with raw system calls. The
// socket is non-blocking, so a call never sleeps in the kernel; when it
// would, the goroutine parks in the runtime's poller as net.Conn's own
// methods do, and deadlines set on the connection apply. What is saved
// is the runtime's bookkeeping around a regular system call: on a busy
// two-core machine that was a futex wake of the runtime's monitor thread
// for many of a proxy's reads and writes.
package rawsock

import (
	"io"
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Conn does the socket I/O of one connection. One goroutine at a time may
// read and one at a time may write; the two may overlap. Calls allocate
// nothing: the callbacks handed to the runtime are bound once and the
// operands live in the struct.
type Conn struct {
	rc syscall.RawConn

	// owned by the reader
	rbuf   []byte
	rn     uintptr
	rerrno syscall.Errno
	rwaits uint64
	readFn func(fd uintptr) bool

	// owned by the writer
	iovecs  []unix.Iovec
	wn      uintptr
	werrno  syscall.Errno
	writeFn func(fd uintptr) bool
}

// New returns nil when nc has no file descriptor (an in-memory pipe);
// callers then use nc's own methods.
func New(nc net.Conn) *Conn {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	c := &Conn{rc: rc}
	c.readFn = c.readOnce
	c.writeFn = c.writeOnce
	return c
}

// RawConn is the connection's descriptor access, for callers that need
// other system calls on it.
func (c *Conn) RawConn() syscall.RawConn { return c.rc }

func (c *Conn) readOnce(fd uintptr) bool {
	c.rn, _, c.rerrno = unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&c.rbuf[0])), uintptr(len(c.rbuf)))
	if c.rerrno == unix.EAGAIN {
		c.rwaits++
		return false
	}
	return true
}

func (c *Conn) writeOnce(fd uintptr) bool {
	c.wn, _, c.werrno = unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&c.iovecs[0])), uintptr(len(c.iovecs)))
	return c.werrno != unix.EAGAIN
}

// ReadWaits counts the reads that found nothing and so waited (or failed
// at their deadline); only the reader may call it.
func (c *Conn) ReadWaits() uint64 { return c.rwaits }

// Read reads what the socket has for p, waiting for at least one byte.
// It returns io.EOF when the peer closed its side.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	defer func() { c.rbuf = nil }()
	for {
		c.rbuf = p
		if err := c.rc.Read(c.readFn); err != nil {
			return 0, err
		}
		switch {
		case c.rerrno == unix.EINTR:
			continue
		case c.rerrno != 0:
			return 0, &net.OpError{Op: "read", Net: "tcp", Err: c.rerrno}
		case c.rn == 0:
			return 0, io.EOF
		}
		return int(c.rn), nil
	}
}

// Write writes all of p.
func (c *Conn) Write(p []byte) (int, error) {
	var one [1][]byte
	one[0] = p
	n, err := c.Writev(one[:])
	return int(n), err
}

// maxIovecs is the kernel's limit on buffers per writev (IOV_MAX); longer
// lists take several calls.
const maxIovecs = 1024

// Writev writes every buffer of bufs, in order, with as few system calls
// as the socket allows. bufs is left as it was.
func (c *Conn) Writev(bufs [][]byte) (int64, error) {
	var total int64
	skip := 0 // bytes of bufs[0] already written
	for len(bufs) > 0 {
		iovs := c.iovecs[:0]
		for i, b := range bufs {
			if i == maxIovecs {
				break
			}
			if i == 0 {
				b = b[skip:]
			}
			if len(b) == 0 {
				continue
			}
			iovs = append(iovs, unix.Iovec{Base: &b[0]})
			iovs[len(iovs)-1].SetLen(len(b))
		}
		c.iovecs = iovs
		if len(iovs) == 0 {
			return total, nil
		}
		if err := c.rc.Write(c.writeFn); err != nil {
			clear(c.iovecs)
			return total, err
		}
		clear(c.iovecs) // keep no references to the caller's buffers
		switch {
		case c.werrno == unix.EINTR:
			continue
		case c.werrno != 0:
			return total, &net.OpError{Op: "write", Net: "tcp", Err: c.werrno}
		}
		n := int(c.wn)
		total += int64(n)
		for n > 0 {
			left := len(bufs[0]) - skip
			if n < left {
				skip += n
				break
			}
			n -= left
			bufs, skip = bufs[1:], 0
		}
		for len(bufs) > 0 && len(bufs[0])-skip == 0 {
			bufs, skip = bufs[1:], 0
		}
	}
	return total, nil
}
