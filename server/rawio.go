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

// sockIO moves data on a TCP connection with raw system calls.
type sockIO struct {
	rc     syscall.RawConn
	iovecs []unix.Iovec // scratch for writev, owned by the single writer
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
	return &sockIO{rc: rc}
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
		var n uintptr
		var errno syscall.Errno
		err := s.rc.Write(func(fd uintptr) bool {
			n, _, errno = unix.RawSyscall(unix.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&iovs[0])), uintptr(len(iovs)))
			return errno != unix.EAGAIN
		})
		if err == nil && errno != 0 && errno != unix.EINTR {
			err = errno
		}
		if err != nil {
			return err
		}
		bufs = consume(bufs, int(n))
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

// readFull fills p from the socket, honouring the connection's deadline.
func (s *sockIO) readFull(p []byte) error {
	for len(p) > 0 {
		var n uintptr
		var errno syscall.Errno
		err := s.rc.Read(func(fd uintptr) bool {
			n, _, errno = unix.RawSyscall(unix.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
			return errno != unix.EAGAIN
		})
		switch {
		case err != nil:
			return err
		case errno == unix.EINTR:
			continue
		case errno != 0:
			return errno
		case n == 0:
			return io.ErrUnexpectedEOF
		}
		p = p[n:]
	}
	return nil
}
