package sparse

import (
	"bytes"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// zeroes is compared against in slices; bytes.Equal runs vectorised, so a
// non-zero buffer is rejected after its first differing word.
var zeroes [64 << 10]byte

// IsZero reports whether every byte of b is zero.
func IsZero(b []byte) bool {
	for len(b) > 0 {
		n := min(len(b), len(zeroes))
		if !bytes.Equal(b[:n], zeroes[:n]) {
			return false
		}
		b = b[n:]
	}
	return true
}

// ErrNotSupported reports that the file system or device cannot do the
// operation (EOPNOTSUPP from fallocate, EINVAL from lseek on a device).
var ErrNotSupported = errors.New("sparse: operation not supported by the file")

// Walk calls fn for consecutive runs of data and holes covering [off, end)
// of the file open as fd, in order, until fn returns false. A file that
// cannot report holes is one run of data. Runs are clipped to [off, end).
func Walk(fd int, off, end int64, fn func(off, length int64, hole bool) bool) error {
	for off < end {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO):
			// No data at or after off: the rest is a hole.
			fn(off, end-off, true)
			return nil
		case errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP):
			fn(off, end-off, false)
			return nil
		case err != nil:
			return fmt.Errorf("sparse: seek data at %d: %w", off, err)
		}
		if data > off {
			if !fn(off, min(data, end)-off, true) || data >= end {
				return nil
			}
			off = data
		}
		hole, err := unix.Seek(fd, off, unix.SEEK_HOLE)
		if err != nil {
			// The data vanished between the two calls (a concurrent
			// truncate); report what is left as data, the safe answer.
			hole = end
		}
		if !fn(off, min(hole, end)-off, false) {
			return nil
		}
		off = hole
	}
	return nil
}

// HasHoles reports whether [0, size) of fd contains at least one hole.
func HasHoles(fd int, size int64) (bool, error) {
	if size == 0 {
		return false, nil
	}
	hole, err := unix.Seek(fd, 0, unix.SEEK_HOLE)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.EOPNOTSUPP) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("sparse: seek hole: %w", err)
	}
	return hole < size, nil
}

// PunchHole deallocates [off, off+length); the range then reads as zeroes
// and the file size is unchanged.
func PunchHole(fd int, off, length int64) error {
	return fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

// ZeroRange makes [off, off+length) read as zeroes while keeping it
// allocated, without writing the zeroes through the page cache.
func ZeroRange(fd int, off, length int64) error {
	return fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length)
}

func fallocate(fd int, mode uint32, off, length int64) error {
	if length == 0 {
		return nil
	}
	for {
		err := unix.Fallocate(fd, mode, off, length)
		switch {
		case err == nil:
			return nil
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EOPNOTSUPP), errors.Is(err, unix.ENOSYS):
			return ErrNotSupported
		}
		return fmt.Errorf("sparse: fallocate(mode %#x, %d, %d): %w", mode, off, length, err)
	}
}

// Size returns the size of a regular file or a block device.
func Size(fd int) (int64, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, fmt.Errorf("sparse: stat: %w", err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		return st.Size, nil
	case unix.S_IFBLK:
		var size uint64
		if err := ioctlGetSize64(fd, &size); err != nil {
			return 0, fmt.Errorf("sparse: block device size: %w", err)
		}
		return int64(size), nil
	}
	return 0, fmt.Errorf("sparse: not a regular file or block device (mode %#o)", st.Mode)
}
