package server

import (
	"io"
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
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
	n, _, errno := unix.RawSyscall6(unix.SYS_PREADV2, uintptr(fd), uintptr(unsafe.Pointer(&iov)), 1,
		uintptr(off), 0, unix.RWF_NOWAIT)
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// sockIO moves data on a TCP connection with raw system calls. The
// callbacks handed to the runtime are bound once, and the system call's
// operands and results live in the struct, so a call allocates nothing.
type sockIO struct {
	rc syscall.RawConn

	// owned by the single writer
	iovecs  []unix.Iovec
	wn      uintptr
	werrno  syscall.Errno
	writeFn func(fd uintptr) bool

	// owned by the single reader
	peekBuf   [1]byte
	peekErrno syscall.Errno
	peekFn    func(fd uintptr) bool
	peekCtl   func(fd uintptr)
	rbuf      []byte
	rn        uintptr
	rerrno    syscall.Errno
	readFn    func(fd uintptr) bool
}

// newSockIO returns nil for connections without a file descriptor (tests'
// in-memory pipes); callers then use the net.Conn methods.
func newSockIO(nc net.Conn) *sockIO {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	s := &sockIO{rc: rc}
	s.writeFn = s.writeOnce
	s.readFn = s.readOnce
	s.peekFn = s.peekOnce
	s.peekCtl = s.peekControl
	return s
}

func (s *sockIO) writeOnce(fd uintptr) bool {
	s.wn, _, s.werrno = unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&s.iovecs[0])), uintptr(len(s.iovecs)))
	return s.werrno != unix.EAGAIN
}

func (s *sockIO) readOnce(fd uintptr) bool {
	s.rn, _, s.rerrno = unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&s.rbuf[0])), uintptr(len(s.rbuf)))
	return s.rerrno != unix.EAGAIN
}

// maxIovecs is the kernel's limit on buffers per writev (IOV_MAX).
const maxIovecs = 1024

// writev sends every byte of bufs, honouring the connection's deadline.
func (s *sockIO) writev(bufs [][]byte) error {
	for len(bufs) > 0 {
		iovs := s.iovecs[:0]
		for _, b := range bufs {
			if len(iovs) == maxIovecs {
				break
			}
			if len(b) == 0 {
				continue
			}
			v := unix.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			iovs = append(iovs, v)
		}
		s.iovecs = iovs
		if len(iovs) == 0 {
			return nil
		}
		err := s.rc.Write(s.writeFn)
		if err == nil && s.werrno != 0 && s.werrno != unix.EINTR {
			err = s.werrno
		}
		if err != nil {
			return err
		}
		if s.werrno == 0 {
			bufs = consume(bufs, int(s.wn))
		}
	}
	return nil
}

// consume drops the first n bytes from bufs.
func consume(bufs [][]byte, n int) [][]byte {
	for len(bufs) > 0 && n >= len(bufs[0]) {
		n -= len(bufs[0])
		bufs = bufs[1:]
	}
	if len(bufs) > 0 {
		bufs[0] = bufs[0][n:]
	}
	return bufs
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

// readSome reads what the socket has for p, at least one byte, waiting
// for it until the connection's deadline.
func (s *sockIO) readSome(p []byte) (int, error) {
	defer func() { s.rbuf = nil }()
	for {
		s.rbuf = p
		err := s.rc.Read(s.readFn)
		switch {
		case err != nil:
			return 0, err
		case s.rerrno == unix.EINTR:
			continue
		case s.rerrno != 0:
			return 0, s.rerrno
		case s.rn == 0:
			return 0, io.ErrUnexpectedEOF
		}
		return int(s.rn), nil
	}
}

// readFull fills p from the socket, honouring the connection's deadline.
func (s *sockIO) readFull(p []byte) error {
	defer func() { s.rbuf = nil }()
	for len(p) > 0 {
		s.rbuf = p
		err := s.rc.Read(s.readFn)
		switch {
		case err != nil:
			return err
		case s.rerrno == unix.EINTR:
			continue
		case s.rerrno != 0:
			return s.rerrno
		case s.rn == 0:
			return io.ErrUnexpectedEOF
		}
		p = p[s.rn:]
	}
	return nil
}

// queued tells whether the peer's bytes wait unread in the socket. Unlike
// hasData it is safe beside the connection's own reader.
func (s *sockIO) queued() bool {
	n := 0
	_ = s.rc.Control(func(fd uintptr) {
		n, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	})
	return n > 0
}
