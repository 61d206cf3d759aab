//go:build linux

package iobench

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// writeEnv is the server side of a WRITE: requests (28-byte header, then
// the payload) arrive on conn and land in the exported file.
type writeEnv struct {
	fd      int
	conn    *net.TCPConn
	raw     syscall.RawConn
	hdr     []byte
	buf     []byte
	mapping []byte // writable shared mapping of the whole file
	pipeR   int
	pipeW   int
	pipeCap int
	zeroes  int // payloads found all-zero by writePwriteZeroCheck
}

func newWriteEnv(tb testing.TB, f *os.File, mapping []byte, conn *net.TCPConn, maxSize int) *writeEnv {
	e := &writeEnv{
		fd:      fileFd(f),
		conn:    conn,
		raw:     rawConn(tb, conn),
		hdr:     make([]byte, requestHeaderLen),
		buf:     make([]byte, maxSize),
		mapping: mapping,
	}
	e.pipeR, e.pipeW, e.pipeCap = newPipe(tb)
	return e
}

// serveOne reads one request header and hands the payload to fn.
func (e *writeEnv) serveOne(fn func(e *writeEnv, off int64, n int) error) error {
	if _, err := io.ReadFull(e.conn, e.hdr); err != nil {
		return err
	}
	if binary.BigEndian.Uint32(e.hdr) != requestMagic {
		return fmt.Errorf("bad request magic %x", e.hdr[:4])
	}
	off := int64(binary.BigEndian.Uint64(e.hdr[16:24]))
	n := int(binary.BigEndian.Uint32(e.hdr[24:28]))
	if n > len(e.buf) {
		return fmt.Errorf("request too large: %d", n)
	}
	return fn(e, off, n)
}

type writeMethod struct {
	name string
	fn   func(e *writeEnv, off int64, n int) error
}

var writeMethods = []writeMethod{
	{"ReadDiscard", writeReadDiscard},
	{"ReadPwrite", writeReadPwrite},
	{"ReadMmapCopy", writeReadMmapCopy},
	{"ReadZeroCheckPwrite", writeReadZeroCheckPwrite},
	{"Splice", writeSplice},
}

// Baseline: receive the payload and drop it, to separate the socket's cost
// from the file's.
func writeReadDiscard(e *writeEnv, off int64, n int) error {
	_, err := io.ReadFull(e.conn, e.buf[:n])
	return err
}

// (a) io.ReadFull into a reused buffer, then pwrite.
func writeReadPwrite(e *writeEnv, off int64, n int) error {
	p := e.buf[:n]
	if _, err := io.ReadFull(e.conn, p); err != nil {
		return err
	}
	return pwriteFull(e.fd, p, off)
}

// (b) io.ReadFull into a reused buffer, then copy into a writable shared
// mapping of the file (no msync: not durable).
func writeReadMmapCopy(e *writeEnv, off int64, n int) error {
	p := e.buf[:n]
	if _, err := io.ReadFull(e.conn, p); err != nil {
		return err
	}
	copy(e.mapping[off:off+int64(n)], p)
	return nil
}

// (c) as (a), with a zero check of the payload first. An all-zero payload
// is turned into a hole punch (the benchmark's payload is random, so only
// the cost of the check itself is measured; the test covers the branch).
func writeReadZeroCheckPwrite(e *writeEnv, off int64, n int) error {
	p := e.buf[:n]
	if _, err := io.ReadFull(e.conn, p); err != nil {
		return err
	}
	if isZero(p) {
		e.zeroes++
		return unix.Fallocate(e.fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, int64(n))
	}
	return pwriteFull(e.fd, p, off)
}

// (d) splice socket -> pipe -> file.
func writeSplice(e *writeEnv, off int64, n int) error {
	inPipe := 0
	for n > 0 {
		var serr error
		err := e.raw.Read(func(fd uintptr) bool {
			progressed := false
			for n > 0 && inPipe < e.pipeCap {
				m, err := unix.Splice(int(fd), nil, e.pipeW, nil, min(n, e.pipeCap-inPipe),
					unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				if m > 0 {
					n -= int(m)
					inPipe += int(m)
					progressed = true
					continue
				}
				switch {
				case err == unix.EINTR:
					continue
				case err == unix.EAGAIN:
					// Socket empty (or pipe full): flush what we have,
					// or wait for the socket to become readable.
					return progressed
				case err != nil:
					serr = err
					return true
				default:
					serr = io.ErrUnexpectedEOF // peer closed mid-payload
					return true
				}
			}
			return true
		})
		if err != nil {
			return err
		}
		if serr != nil {
			return serr
		}
		for inPipe > 0 {
			m, err := unix.Splice(e.pipeR, nil, e.fd, &off, inPipe, unix.SPLICE_F_MOVE)
			if m > 0 {
				inPipe -= int(m)
				continue
			}
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			return io.ErrShortWrite
		}
	}
	return nil
}

// sendWrites is the NBD client: it keeps sending WRITE requests of the
// given size (offsets from gen, random payload) until the connection
// breaks. Frames are batched into one large buffer per write(2) so that
// the sender's syscalls stay cheap relative to the server's work.
func sendWrites(c *net.TCPConn, size int, gen *offsetGen, done chan<- struct{}) {
	defer close(done)
	frames := max(1, (4<<20)/size)
	frameLen := requestHeaderLen + size
	chunk := make([]byte, frames*frameLen)
	fillRandom(chunk, 42)
	var handle uint64
	for {
		for i := 0; i < frames; i++ {
			handle++
			putRequestHeader(chunk[i*frameLen:], handle, gen.Next(), size)
		}
		if _, err := c.Write(chunk); err != nil {
			return
		}
	}
}

func BenchmarkWrite(b *testing.B) {
	f := makeDataFile(b, b.TempDir(), benchFileSize)
	mapping := mmapFile(b, f, benchFileSize, unix.PROT_READ|unix.PROT_WRITE)
	for _, m := range writeMethods {
		for _, sc := range benchSizes {
			b.Run(m.name+"/"+sc.name, func(b *testing.B) {
				server, client := tcpPair(b)
				done := make(chan struct{})
				go sendWrites(client, sc.size, newOffsetGen(sc.size, benchFileSize, sc.random, 2), done)
				e := newWriteEnv(b, f, mapping, server, sc.size)
				b.SetBytes(int64(sc.size))
				b.ReportAllocs()
				b.ResetTimer()
				cpu := startCPU()
				for i := 0; i < b.N; i++ {
					if err := e.serveOne(m.fn); err != nil {
						b.Fatal(err)
					}
				}
				cpu.stop(b)
				server.Close()
				client.Close()
				<-done
				if e.zeroes != 0 {
					b.Fatalf("%d random payloads judged all-zero", e.zeroes)
				}
			})
		}
	}
}

// TestWriteMethods checks that every write candidate leaves the file with
// exactly the payloads sent, including all-zero payloads.
func TestWriteMethods(t *testing.T) {
	const size = 8 << 20
	type req struct {
		off  int64
		n    int
		zero bool
	}
	reqs := []req{{0, 4096, false}, {4096 * 9, 4096, false}, {size - 4096, 4096, false},
		{1 << 20, 1 << 20, false}, {3 << 20, 1 << 20, true}, {5<<20 + 512, 2 << 20, false},
		{64 << 10, 64 << 10, true}}
	for _, m := range writeMethods[1:] { // not the ReadDiscard baseline
		t.Run(m.name, func(t *testing.T) {
			f := makeDataFile(t, t.TempDir(), size)
			mapping := mmapFile(t, f, size, unix.PROT_READ|unix.PROT_WRITE)
			want := make([]byte, size)
			if _, err := f.ReadAt(want, 0); err != nil {
				t.Fatal(err)
			}
			server, client := tcpPair(t)
			defer server.Close()
			var stream bytes.Buffer
			for i, r := range reqs {
				h := make([]byte, requestHeaderLen)
				putRequestHeader(h, uint64(i+1), r.off, r.n)
				p := make([]byte, r.n)
				if !r.zero {
					fillRandom(p, byte(100+i))
				}
				copy(want[r.off:], p)
				stream.Write(h)
				stream.Write(p)
			}
			go func() {
				defer client.Close()
				client.Write(stream.Bytes())
				io.Copy(io.Discard, client) // until the server closes
			}()
			e := newWriteEnv(t, f, mapping, server, 2<<20)
			for i := range reqs {
				if err := e.serveOne(m.fn); err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
			}
			got := make([]byte, size)
			if _, err := f.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatal("file contents differ from the payloads written")
			}
		})
	}
}
