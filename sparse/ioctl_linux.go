package sparse

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctlGetSize64 reads a block device's size in bytes (BLKGETSIZE64).
func ioctlGetSize64(fd int, size *uint64) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(size)))
	if errno != 0 {
		return errno
	}
	return nil
}
