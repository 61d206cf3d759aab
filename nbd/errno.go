package nbd

import (
	"errors"
	"strconv"
	"syscall"
)

// Errno is an error value as carried in the error field of a reply.
// The zero value means success and is never returned as an error.
type Errno uint32

// The error values the specification defines.
const (
	EPERM     Errno = 1   // NBD_EPERM
	EIO       Errno = 5   // NBD_EIO
	ENOMEM    Errno = 12  // NBD_ENOMEM
	EINVAL    Errno = 22  // NBD_EINVAL
	ENOSPC    Errno = 28  // NBD_ENOSPC
	EOVERFLOW Errno = 75  // NBD_EOVERFLOW
	ENOTSUP   Errno = 95  // NBD_ENOTSUP
	ESHUTDOWN Errno = 108 // NBD_ESHUTDOWN

	// EBADMSG is not in the specification: the C flexnbd sends it in
	// the reply to a request header with a bad magic, then disconnects.
	EBADMSG Errno = 74
)

func (e Errno) Error() string {
	switch e {
	case EPERM:
		return "nbd: operation not permitted (EPERM)"
	case EIO:
		return "nbd: input/output error (EIO)"
	case ENOMEM:
		return "nbd: cannot allocate memory (ENOMEM)"
	case EINVAL:
		return "nbd: invalid argument (EINVAL)"
	case ENOSPC:
		return "nbd: no space left on device (ENOSPC)"
	case EOVERFLOW:
		return "nbd: value too large (EOVERFLOW)"
	case ENOTSUP:
		return "nbd: operation not supported (ENOTSUP)"
	case ESHUTDOWN:
		return "nbd: server is shutting down (ESHUTDOWN)"
	case EBADMSG:
		return "nbd: bad message (EBADMSG)"
	}
	return "nbd: error " + strconv.FormatUint(uint64(e), 10)
}

// Errno lets wrapped errors expose their wire code through errors.As.
func (e Errno) Errno() Errno { return e }

// ErrnoOf maps any error to the code a server should send for it. An error
// that carries an Errno (directly or through an Errno() method) keeps it;
// system errors map to their NBD counterparts; anything else is EIO, the
// only honest answer for a failure the server did not anticipate.
func ErrnoOf(err error) Errno {
	if err == nil {
		return 0
	}
	var coder interface{ Errno() Errno }
	if errors.As(err, &coder) {
		return coder.Errno()
	}
	var se syscall.Errno
	if errors.As(err, &se) {
		switch se {
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return EPERM
		case syscall.ENOMEM:
			return ENOMEM
		case syscall.EINVAL:
			return EINVAL
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return ENOSPC
		case syscall.EOVERFLOW:
			return EOVERFLOW
		case syscall.EOPNOTSUPP:
			return ENOTSUP
		case syscall.ESHUTDOWN:
			return ESHUTDOWN
		}
	}
	return EIO
}
