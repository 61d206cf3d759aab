package server

import (
	"errors"
	"fmt"
	"os"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/sparse"
)

// Backend is the storage behind the export. File is the real one; tests
// substitute backends that fail or stall to check how the server copes.
//
// The server never issues overlapping calls concurrently, except reads with
// reads, so a Backend needs no locking of its own for data consistency.
type Backend interface {
	// Size is the export size in bytes; it does not change while serving.
	Size() uint64
	// ReadAt fills p from off entirely or fails. With nowait it may
	// instead fail with ErrWouldBlock when the data is not at hand (not in
	// the page cache), so that the caller can retry where blocking is fine.
	ReadAt(p []byte, off uint64, nowait bool) error
	// WriteAt writes p at off; with fua it returns once p is durable.
	WriteAt(p []byte, off uint64, fua bool) error
	// Sync makes every completed write durable.
	Sync() error
	// Trim discards a range; it may do nothing.
	Trim(off, length uint64) error
	// Zero makes a range read as zeroes, deallocating it unless noHole.
	// With fastOnly it must fail with nbd.ENOTSUP rather than fall back
	// to writing zeroes.
	Zero(off, length uint64, noHole, fastOnly bool) error
	// Extents calls fn with consecutive data and hole runs covering
	// [off, off+length) until fn returns false.
	Extents(off, length uint64, fn func(off, length uint64, hole bool) bool) error
	// MayHaveHoles is false when the backend knows every byte is allocated,
	// which lets reads skip the extent lookup.
	MayHaveHoles() bool
	// Cache hints that a range will be read soon.
	Cache(off, length uint64) error
}

// ErrWouldBlock is returned by a nowait ReadAt that would have to wait.
var ErrWouldBlock = errors.New("server: read would block")

// File serves a regular file or a block device.
type File struct {
	f        *os.File
	fd       int
	size     uint64
	readOnly bool
	// holes is set once any hole exists (found at open or punched since).
	holes atomic.Bool
}

// OpenFile opens path for serving. The export size is the file size rounded
// down to a multiple of 512, as the C flexnbd does.
func OpenFile(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	fd := int(f.Fd())
	size, err := sparse.Size(fd)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	size &^= 511
	file := &File{f: f, fd: fd, size: uint64(size), readOnly: readOnly}
	holes, err := sparse.HasHoles(fd, size)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	file.holes.Store(holes)
	return file, nil
}

// Close closes the file.
func (f *File) Close() error { return f.f.Close() }

// OSFile is the open file, for callers that hand its data to the kernel
// (a migration's sendfile). It stays owned by f: do not close it.
func (f *File) OSFile() *os.File { return f.f }

// Size implements Backend.
func (f *File) Size() uint64 { return f.size }

// MayHaveHoles implements Backend.
func (f *File) MayHaveHoles() bool { return f.holes.Load() }

// ReadAt implements Backend. Reading a hole returns zeroes without
// allocating anything. nowait uses RWF_NOWAIT, which fails instead of
// starting disk I/O.
func (f *File) ReadAt(p []byte, off uint64, nowait bool) error {
	// Whatever the page cache holds is copied without a blocking call.
	for len(p) > 0 {
		n, err := preadNoWait(f.fd, p, int64(off))
		if err != nil || n == 0 {
			break
		}
		p = p[n:]
		off += uint64(n)
	}
	if len(p) == 0 {
		return nil
	}
	if nowait {
		return ErrWouldBlock
	}
	iov := [][]byte{nil}
	for len(p) > 0 {
		iov[0] = p
		n, err := unix.Preadv2(f.fd, iov, int64(off), 0)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case err != nil:
			return err
		case n == 0:
			// The file shrank under us: it is no longer the export we
			// announced, and zeroes would be a lie.
			return unix.EIO
		}
		p = p[n:]
		off += uint64(n)
	}
	return nil
}

// zeroBlock is the unit in which a write's zeroes are left out where
// they land in a hole: the file system's block, which it allocates whole.
const zeroBlock = 4096

// WriteAt implements Backend. Zeroes aimed at a hole are not written, a
// block at a time, so copying a sparse image keeps it sparse even when the
// copier sends holes as data inside larger writes (the C flexnbd's mirror
// sends the whole file as 8 MiB WRITEs).
func (f *File) WriteAt(p []byte, off uint64, fua bool) error {
	if f.holes.Load() && hasZeroBlock(p, off) {
		return f.writeSkippingHoles(p, off, fua)
	}
	return f.write(p, off, fua)
}

// hasZeroBlock reports whether p, to be written at off, holds a block of
// zeroes, blocks being aligned as in the file (the first and last may be
// partial). A block of data usually shows itself in its first bytes.
func hasZeroBlock(p []byte, off uint64) bool {
	for len(p) > 0 {
		n := min(zeroBlock-int(off%zeroBlock), len(p))
		if sparse.IsZero(p[:n]) {
			return true
		}
		p, off = p[n:], off+uint64(n)
	}
	return false
}

func (f *File) write(p []byte, off uint64, fua bool) error {
	flags := 0
	if fua {
		flags = unix.RWF_DSYNC
	}
	syncAfter := false
	iov := [][]byte{nil}
	for len(p) > 0 {
		iov[0] = p
		n, err := unix.Pwritev2(f.fd, iov, int64(off), flags)
		switch {
		case errors.Is(err, unix.EINTR):
			continue
		case errors.Is(err, unix.EOPNOTSUPP) && flags != 0:
			// A kernel or file without per-write sync: sync the file.
			flags, syncAfter = 0, true
			continue
		case err != nil:
			return err
		}
		p = p[n:]
		off += uint64(n)
	}
	if syncAfter {
		return f.Sync()
	}
	return nil
}

// writeSkippingHoles writes p at off except for the blocks of zeroes that
// land in holes, which read as zeroes already. Overlapping writes are
// serialised by the server, so no data can arrive in a hole between the
// look and the write; a neighbour's write into the same file system block
// allocates it zero-filled, which is what was skipped.
func (f *File) writeSkippingHoles(p []byte, off uint64, fua bool) error {
	pending := off // the start of what is still to be written
	var werr error
	err := f.Extents(off, uint64(len(p)), func(o, n uint64, hole bool) bool {
		for end := o + n; hole && o < end; {
			k := min(zeroBlock-o%zeroBlock, end-o)
			if sparse.IsZero(p[o-off : o-off+k]) {
				if o > pending {
					if werr = f.write(p[pending-off:o-off], pending, false); werr != nil {
						return false
					}
				}
				pending = o + k
			}
			o += k
		}
		return true
	})
	if err == nil {
		err = werr
	}
	if end := off + uint64(len(p)); err == nil && pending < end {
		err = f.write(p[pending-off:], pending, false)
	}
	if err == nil && fua {
		err = f.Sync()
	}
	return err
}

// Sync implements Backend with fdatasync: the file's size never changes,
// and fdatasync still covers the allocation changes needed to read data back.
func (f *File) Sync() error {
	for {
		err := unix.Fdatasync(f.fd)
		if !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}

// Trim implements Backend by punching a hole.
func (f *File) Trim(off, length uint64) error {
	err := sparse.PunchHole(f.fd, int64(off), int64(length))
	if errors.Is(err, sparse.ErrNotSupported) {
		return nil // a trim is only a hint
	}
	if err == nil {
		f.holes.Store(true)
	}
	return err
}

// Zero implements Backend.
func (f *File) Zero(off, length uint64, noHole, fastOnly bool) error {
	var err error
	if noHole {
		err = sparse.ZeroRange(f.fd, int64(off), int64(length))
	} else {
		err = sparse.PunchHole(f.fd, int64(off), int64(length))
		if err == nil {
			f.holes.Store(true)
		}
	}
	if !errors.Is(err, sparse.ErrNotSupported) {
		return err
	}
	if fastOnly {
		return nbd.ENOTSUP
	}
	return f.writeZeroes(off, length)
}

// writeZeroes is the slow path for files that cannot zero by allocation.
func (f *File) writeZeroes(off, length uint64) error {
	buf := make([]byte, min(length, 1<<20))
	for length > 0 {
		n := min(length, uint64(len(buf)))
		if err := f.write(buf[:n], off, false); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// Extents implements Backend.
func (f *File) Extents(off, length uint64, fn func(off, length uint64, hole bool) bool) error {
	if !f.holes.Load() {
		fn(off, length, false)
		return nil
	}
	return sparse.Walk(f.fd, int64(off), int64(off+length), func(o, n int64, hole bool) bool {
		return fn(uint64(o), uint64(n), hole)
	})
}

// Cache implements Backend with readahead into the page cache.
func (f *File) Cache(off, length uint64) error {
	return unix.Fadvise(f.fd, int64(off), int64(length), unix.FADV_WILLNEED)
}
