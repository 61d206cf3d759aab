// Package sparse holds the Linux file operations that keep an export
// sparse: finding data and holes (SEEK_DATA, SEEK_HOLE), punching holes and
// zeroing ranges (fallocate), detecting all-zero buffers, and sizing regular
// files and block devices alike.
//
// Everything here works on a raw file descriptor so that callers keep
// control of their *os.File and its lifetime.
//
// BUG(1): block devices do not report holes; Walk presents them as data.
package sparse
