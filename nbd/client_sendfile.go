package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNoSendFile: the connection has no file descriptor to splice into
// (an in-memory pipe), so WriteFile cannot be used.
var ErrNoSendFile = errors.New("nbd: connection cannot take file data from the kernel")

// fileRange is a WRITE payload that stays in a file.
type fileRange struct {
	f   syscall.RawConn
	off int64
	n   int
}

// CanSendFile reports whether WriteFile works on this connection.
func (c *Client) CanSendFile() bool {
	_, ok := c.conn.(syscall.Conn)
	return ok
}

// WriteFile sends a WRITE of length bytes at off whose payload the kernel
// copies from f at fileOff with sendfile(2): the data never passes through
// this process, which saves a read into a buffer and a copy into the
// socket. The bytes sent are those f holds when the kernel reads them, which
// may be after WriteFile returned to the reply; callers that need a
// snapshot must not change that range until the reply.
func (c *Client) WriteFile(ctx context.Context, f *os.File, fileOff int64, length uint32, off uint64, flags CmdFlags) error {
	if !c.CanSendFile() {
		return ErrNoSendFile
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return fmt.Errorf("nbd: payload file: %w", err)
	}
	req := Request{Type: CmdWrite, Flags: flags, Offset: off, Length: length}
	_, err = c.do(ctx, req, nil, &fileRange{f: rc, off: fileOff, n: int(length)}, nil)
	return err
}

// sendFromFile writes hdr and then src's bytes to the connection; the
// caller holds wmu. The header goes with MSG_MORE so that it leaves in the
// same segment as the start of the payload. A file that ends early breaks
// the connection: the server expects the whole payload.
func (c *Client) sendFromFile(hdr []byte, src *fileRange) error {
	out, err := c.conn.(syscall.Conn).SyscallConn()
	if err != nil {
		return err
	}
	more := unix.MSG_MORE
	if src.n == 0 {
		more = 0 // nothing follows to flush the header out
	}
	err = rawSend(out, len(hdr), func(fd int) (int, error) {
		n, err := unix.SendmsgN(fd, hdr, nil, nil, more|unix.MSG_NOSIGNAL)
		hdr = hdr[max(n, 0):]
		return n, err
	})
	if err != nil {
		return err
	}
	off, left := src.off, src.n
	cerr := src.f.Control(func(in uintptr) {
		err = rawSend(out, left, func(fd int) (int, error) {
			n, err := unix.Sendfile(fd, int(in), &off, min(left, 1<<30))
			left -= max(n, 0)
			return n, err
		})
	})
	if cerr != nil {
		return cerr
	}
	return err
}

// rawSend calls send until n bytes have gone, waiting in the runtime's
// poller whenever the socket is full. A call that moves nothing without an
// error means the source ran out.
func rawSend(out syscall.RawConn, n int, send func(fd int) (int, error)) error {
	var serr error
	err := out.Write(func(fd uintptr) bool {
		for n > 0 {
			k, err := send(int(fd))
			n -= max(k, 0)
			switch {
			case errors.Is(err, unix.EAGAIN):
				return false
			case errors.Is(err, unix.EINTR):
				continue
			case err != nil:
				serr = err
				return true
			case k == 0:
				serr = io.ErrUnexpectedEOF
				return true
			}
		}
		return true
	})
	if err != nil {
		return err
	}
	return serr
}
