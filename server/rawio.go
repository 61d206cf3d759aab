package server

import (
	"math/bits"
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/flexnbd/flexnbd/internal/rawsock"
)

// The data path issues its copies with raw system calls where they cannot
// block: reads of cached file data (RWF_NOWAIT) and socket I/O (the socket
// is non-blocking; EAGAIN parks the goroutine in the netpoller as usual).
// A regular system call that copies a megabyte outlives the runtime's 20 µs
// patience, which then hands the processor to another thread and back:
// measured at a fifth of the CPU of 1 MiB reads on two cores. A raw call
// keeps the processor, which is what a copy that never sleeps should do.

// preadNoWait reads from the page cache only: it returns how much it read
// and EAGAIN when the rest would need the disk.
func preadNoWait(fd int, p []byte, off int64) (int, error) {
	iov := unix.Iovec{Base: &p[0]}
	iov.SetLen(len(p))
	// The kernel takes the offset as two words, low then high, and on a
	// 64-bit kernel ignores the high one.
	lo, hi := uintptr(off), uintptr(uint64(off)>>(bits.UintSize-1)>>1)
	n, _, errno := unix.RawSyscall6(unix.SYS_PREADV2, uintptr(fd), uintptr(unsafe.Pointer(&iov)), 1,
		lo, hi, unix.RWF_NOWAIT)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// sockIO moves data on a TCP connection with raw system calls
// (internal/rawsock), and adds what only the server needs: checking for
// data without reading it, and waiting for it without a buffer. The peek's
// callbacks are bound once and its operands live in the struct, so a call
// allocates nothing.
type sockIO struct {
	*rawsock.Conn
	rc syscall.RawConn

	// owned by the single reader
	peekBuf   [1]byte
	peekErrno syscall.Errno
	peekFn    func(fd uintptr) bool
	peekCtl   func(fd uintptr)
}

// newSockIO returns nil for connections without a file descriptor (tests'
// in-memory pipes); callers then use the net.Conn methods.
func newSockIO(nc net.Conn) *sockIO {
	raw := rawsock.New(nc)
	if raw == nil {
		return nil
	}
	s := &sockIO{Conn: raw, rc: raw.RawConn()}
	s.peekFn = s.peekOnce
	s.peekCtl = s.peekControl
	return s
}

// hasData reports, without waiting or reading, whether the socket has
// data (or an end or error) for a read.
func (s *sockIO) hasData() bool {
	_ = s.rc.Control(s.peekCtl)
	return s.peekErrno != unix.EAGAIN
}

// waitReadable returns once the socket has data (or an end or error) for
// a read, without reading it, honouring the connection's deadline.
func (s *sockIO) waitReadable() error {
	return s.rc.Read(s.peekFn)
}

func (s *sockIO) peekOnce(fd uintptr) bool {
	// A peek rather than trusting the poller: data may be waiting
	// without a new readiness event to wake it.
	_, _, s.peekErrno = unix.RawSyscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&s.peekBuf[0])), 1,
		unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
	return s.peekErrno != unix.EAGAIN
}

func (s *sockIO) peekControl(fd uintptr) { s.peekOnce(fd) }

// queued tells whether the peer's bytes wait unread in the socket. Unlike
// hasData it is safe beside the connection's own reader.
func (s *sockIO) queued() bool {
	n := 0
	_ = s.rc.Control(func(fd uintptr) {
		n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	})
	return n > 0
}
