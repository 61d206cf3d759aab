//go:build linux

package iobench

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

const (
	// benchFileSize is the size of the exported file the benchmarks use.
	benchFileSize = 256 << 20

	// NBD wire framing: a simple reply header is 16 bytes, a request
	// header 28 bytes.
	replyHeaderLen   = 16
	requestHeaderLen = 28
	replyMagic       = 0x67446698
	requestMagic     = 0x25609513
	cmdWrite         = 1

	// pipeSize is the capacity asked for the splice pipes (the default
	// /proc/sys/fs/pipe-max-size, so it works unprivileged too).
	pipeSize = 1 << 20
)

// sizeCase is one request size: 4 KiB requests go to random aligned
// offsets, 1 MiB requests walk the file sequentially.
type sizeCase struct {
	name   string
	size   int
	random bool
}

var benchSizes = []sizeCase{
	{"4KiB", 4 << 10, true},
	{"1MiB", 1 << 20, false},
}

// offsetGen hands out request offsets within [0, limit).
type offsetGen struct {
	size   int64
	limit  int64
	random bool
	offs   []int64 // precomputed random offsets (random mode)
	i      int
	next   int64 // next sequential offset
}

func newOffsetGen(size int, limit int64, random bool, seed uint64) *offsetGen {
	g := &offsetGen{size: int64(size), limit: limit, random: random}
	if random {
		r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
		slots := limit / int64(size)
		g.offs = make([]int64, 1<<16)
		for i := range g.offs {
			g.offs[i] = r.Int64N(slots) * int64(size)
		}
	}
	return g
}

func (g *offsetGen) Next() int64 {
	if g.random {
		off := g.offs[g.i]
		g.i = (g.i + 1) & (len(g.offs) - 1)
		return off
	}
	off := g.next
	g.next += g.size
	if g.next+g.size > g.limit {
		g.next = 0
	}
	return off
}

// fillRandom fills p with deterministic pseudo-random bytes.
func fillRandom(p []byte, seed byte) {
	var key [32]byte
	for i := range key {
		key[i] = seed + byte(i)
	}
	_, _ = rand.NewChaCha8(key).Read(p)
}

// fillChunk is the size of the writes that fill the data files. It can be
// changed with IOBENCH_FILL_CHUNK (bytes): the page cache keeps the folio
// sizes those writes created, and on kernels whose ext4 uses large folios
// that changes the cost of later small writes (see RESULTS.md).
func fillChunk(tb testing.TB) int {
	s := os.Getenv("IOBENCH_FILL_CHUNK")
	if s == "" {
		return 1 << 20
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 4096 || n > 1<<20 || n&(n-1) != 0 {
		tb.Fatalf("IOBENCH_FILL_CHUNK=%q: want a power of two in [4096, 1048576]", s)
	}
	return n
}

// makeDataFile creates a file of the given size filled with random data,
// flushes it to disk (so that later benchmarks start from clean pages)
// and reads it back so that it is entirely in the page cache.
func makeDataFile(tb testing.TB, dir string, size int64) *os.File {
	tb.Helper()
	f, err := os.OpenFile(filepath.Join(dir, "export.img"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	chunk := make([]byte, fillChunk(tb))
	for off := int64(0); off < size; off += int64(len(chunk)) {
		n := min(int64(len(chunk)), size-off)
		fillRandom(chunk[:n], byte(off>>12))
		if _, err := f.WriteAt(chunk[:n], off); err != nil {
			tb.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		tb.Fatal(err)
	}
	warmCache(tb, f, size)
	return f
}

// warmCache reads the whole file so that it is resident in the page cache.
func warmCache(tb testing.TB, f *os.File, size int64) {
	tb.Helper()
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; off += int64(len(buf)) {
		if _, err := f.ReadAt(buf, off); err != nil && !errors.Is(err, io.EOF) {
			tb.Fatal(err)
		}
	}
}

// tcpPair returns the two ends of a loopback TCP connection: server is the
// NBD server's end, client the peer's.
func tcpPair(tb testing.TB) (server, client *net.TCPConn) {
	tb.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   *net.TCPConn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.AcceptTCP()
		ch <- res{c, err}
	}()
	client, err = net.DialTCP("tcp4", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		tb.Fatal(err)
	}
	r := <-ch
	if r.err != nil {
		client.Close()
		tb.Fatal(r.err)
	}
	return r.c, client
}

// rawConn returns the syscall.RawConn of a TCP connection.
func rawConn(tb testing.TB, c *net.TCPConn) syscall.RawConn {
	tb.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	return rc
}

// newPipe creates a pipe of capacity pipeSize for splicing.
func newPipe(tb testing.TB) (r, w, capacity int) {
	tb.Helper()
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() {
		unix.Close(p[0])
		unix.Close(p[1])
	})
	capacity, err := unix.FcntlInt(uintptr(p[1]), unix.F_SETPIPE_SZ, pipeSize)
	if err != nil {
		tb.Fatal(fmt.Errorf("F_SETPIPE_SZ: %w", err))
	}
	return p[0], p[1], capacity
}

// fileFd returns the descriptor of f. The *os.File stays referenced by the
// caller for the whole benchmark, so the descriptor stays valid.
func fileFd(f *os.File) int { return int(f.Fd()) }

// preadFull reads len(p) bytes at off, failing on a short file.
func preadFull(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pread(fd, p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return io.ErrUnexpectedEOF
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

// pwriteFull writes all of p at off.
func pwriteFull(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(fd, p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

func putReplyHeader(h []byte, handle uint64) {
	binary.BigEndian.PutUint32(h[0:4], replyMagic)
	binary.BigEndian.PutUint32(h[4:8], 0)
	binary.BigEndian.PutUint64(h[8:16], handle)
}

func putRequestHeader(h []byte, handle uint64, off int64, length int) {
	binary.BigEndian.PutUint32(h[0:4], requestMagic)
	binary.BigEndian.PutUint16(h[4:6], 0)
	binary.BigEndian.PutUint16(h[6:8], cmdWrite)
	binary.BigEndian.PutUint64(h[8:16], handle)
	binary.BigEndian.PutUint64(h[16:24], uint64(off))
	binary.BigEndian.PutUint32(h[24:28], uint32(length))
}

// cpuMeter measures the CPU time the whole process (every thread: the
// benchmark goroutine, the peer goroutine on the other end of the socket,
// the Go runtime, and kernel work done in the context of those threads)
// spends during a benchmark loop.
type cpuMeter struct{ start int64 }

func processCPU() int64 {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_PROCESS_CPUTIME_ID, &ts); err != nil {
		return 0
	}
	return ts.Nano()
}

func startCPU() cpuMeter { return cpuMeter{processCPU()} }

// stop stops the benchmark timer and reports cpu-ns/op.
func (m cpuMeter) stop(b *testing.B) {
	b.StopTimer()
	if b.N > 0 {
		b.ReportMetric(float64(processCPU()-m.start)/float64(b.N), "cpu-ns/op")
	}
}
