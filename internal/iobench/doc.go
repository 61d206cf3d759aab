// Package iobench holds micro-benchmarks that compare ways of moving data
// between an exported file (through the page cache) and a TCP socket, as an
// NBD server does for READ and WRITE requests, plus the cost of durability
// primitives, of all-zero payload detection and of SEEK_DATA/SEEK_HOLE.
//
// The package has no non-test code: everything lives in _test.go files and
// is Linux-only. Run the benchmarks with
//
//	go test -run='^$' -bench=. -benchtime=1s -count=5 ./internal/iobench/
//
// and see RESULTS.md in this directory for measured numbers and the
// recommendation drawn from them (raw outputs are in results/). The plain
// tests (go test ./internal/iobench/) check that every candidate moves the
// right bytes, so that the benchmarks measure working code, and
// TestZeroCopyAliasing (run with -v) shows whether sendfile/splice replies
// can carry data written after the reply was sent.
//
// IOBENCH_FILL_CHUNK (bytes, a power of two from 4096 to 1048576, default
// 1048576) sets the size of the writes that fill the data files; it decides
// the page-cache folio sizes, which matter for small writes on ext4 with
// large folios.
package iobench
