//go:build linux

package iobench

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// readEnv is the server side of a READ: the exported file and the socket a
// reply (16-byte header, then the data) is sent on.
type readEnv struct {
	fd      int
	conn    *net.TCPConn
	raw     syscall.RawConn
	hdr     []byte // reply header, separate buffer
	data    []byte // data buffer for pread
	one     []byte // header and data in one buffer
	mapping []byte // read-only shared mapping of the whole file
	pipeR   int
	pipeW   int
	pipeCap int
	handle  uint64
}

func newReadEnv(tb testing.TB, f *os.File, mapping []byte, conn *net.TCPConn, maxSize int) *readEnv {
	e := &readEnv{
		fd:      fileFd(f),
		conn:    conn,
		raw:     rawConn(tb, conn),
		hdr:     make([]byte, replyHeaderLen),
		data:    make([]byte, maxSize),
		one:     make([]byte, replyHeaderLen+maxSize),
		mapping: mapping,
	}
	e.pipeR, e.pipeW, e.pipeCap = newPipe(tb)
	return e
}

type readMethod struct {
	name string
	fn   func(e *readEnv, off int64, n int) error
}

var readMethods = []readMethod{
	{"NoFileWrite", readNoFileWrite},
	{"PreadWritev", readPreadWritev},
	{"PreadOneWrite", readPreadOneWrite},
	{"MmapWritev", readMmapWritev},
	{"Sendfile", readSendfile},
	{"SendfileMsgMore", readSendfileMsgMore},
	{"Splice", readSplice},
}

// Baseline: send header and a buffer already in memory with one write,
// without touching the file, to separate the socket's cost from the file's.
func readNoFileWrite(e *readEnv, off int64, n int) error {
	e.handle++
	buf := e.one[:replyHeaderLen+n]
	putReplyHeader(buf, e.handle)
	_, err := e.conn.Write(buf)
	return err
}

// (a) pread into a reused buffer, then header+data as one writev.
func readPreadWritev(e *readEnv, off int64, n int) error {
	e.handle++
	putReplyHeader(e.hdr, e.handle)
	data := e.data[:n]
	if err := preadFull(e.fd, data, off); err != nil {
		return err
	}
	v := net.Buffers{e.hdr, data}
	_, err := v.WriteTo(e.conn)
	return err
}

// (b) header and data in one buffer (pread lands right after the header,
// so no extra memcpy is needed), then one write.
func readPreadOneWrite(e *readEnv, off int64, n int) error {
	e.handle++
	buf := e.one[:replyHeaderLen+n]
	putReplyHeader(buf, e.handle)
	if err := preadFull(e.fd, buf[replyHeaderLen:], off); err != nil {
		return err
	}
	_, err := e.conn.Write(buf)
	return err
}

// (c) writev of the header and a slice of a read-only mapping of the file.
func readMmapWritev(e *readEnv, off int64, n int) error {
	e.handle++
	putReplyHeader(e.hdr, e.handle)
	v := net.Buffers{e.hdr, e.mapping[off : off+int64(n)]}
	_, err := v.WriteTo(e.conn)
	return err
}

// (d) header with a plain write, then sendfile(2) from the file.
func readSendfile(e *readEnv, off int64, n int) error {
	e.handle++
	putReplyHeader(e.hdr, e.handle)
	if _, err := e.conn.Write(e.hdr); err != nil {
		return err
	}
	return e.sendfile(off, n)
}

// (d') as (d), but the header is sent with MSG_MORE so that it shares a
// segment with the start of the data instead of going out alone
// (Go sets TCP_NODELAY).
func readSendfileMsgMore(e *readEnv, off int64, n int) error {
	e.handle++
	putReplyHeader(e.hdr, e.handle)
	var serr error
	hdr := e.hdr
	err := e.raw.Write(func(fd uintptr) bool {
		for len(hdr) > 0 {
			w, err := unix.SendmsgN(int(fd), hdr, nil, nil, unix.MSG_MORE)
			if w > 0 {
				hdr = hdr[w:]
			}
			switch {
			case err == unix.EAGAIN:
				return false
			case err == unix.EINTR:
				continue
			case err != nil:
				serr = err
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
	return e.sendfile(off, n)
}

// sendfile sends n bytes of the file at off on the socket, waiting for
// writability through the runtime poller when the socket buffer is full.
func (e *readEnv) sendfile(off int64, n int) error {
	var serr error
	err := e.raw.Write(func(fd uintptr) bool {
		for n > 0 {
			w, err := unix.Sendfile(int(fd), e.fd, &off, n)
			if w > 0 {
				n -= w
			}
			switch {
			case err == unix.EAGAIN:
				return false // poller waits for POLLOUT, then calls us again
			case err == unix.EINTR:
				continue
			case err != nil:
				serr = err
				return true
			case w == 0:
				serr = io.ErrUnexpectedEOF // file shrank under us
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

// (e) header written into a pipe, file pages spliced into the pipe, then
// the pipe spliced into the socket.
func readSplice(e *readEnv, off int64, n int) error {
	e.handle++
	putReplyHeader(e.hdr, e.handle)
	// The pipe is empty between requests, so this cannot block.
	if _, err := unix.Write(e.pipeW, e.hdr); err != nil {
		return err
	}
	inPipe := replyHeaderLen
	for n > 0 || inPipe > 0 {
		for n > 0 {
			m, err := unix.Splice(e.fd, &off, e.pipeW, nil, n, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			if m > 0 {
				n -= int(m)
				inPipe += int(m)
				continue
			}
			if err == unix.EINTR {
				continue
			}
			if err == unix.EAGAIN {
				break // pipe full: drain it first
			}
			if err != nil {
				return err
			}
			return io.ErrUnexpectedEOF // m == 0: file shrank
		}
		more := n > 0
		var serr error
		err := e.raw.Write(func(fd uintptr) bool {
			for inPipe > 0 {
				flags := unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK
				if more {
					flags |= unix.SPLICE_F_MORE
				}
				m, err := unix.Splice(e.pipeR, nil, int(fd), nil, inPipe, flags)
				if m > 0 {
					inPipe -= int(m)
				}
				switch {
				case err == unix.EAGAIN:
					return false
				case err == unix.EINTR:
					continue
				case err != nil:
					serr = err
					return true
				case m == 0:
					serr = io.ErrUnexpectedEOF
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
	}
	return nil
}

// mmapFile maps the whole file read-only (MAP_POPULATE, so the page tables
// of the cached file are filled up front, as in a long-running server).
func mmapFile(tb testing.TB, f *os.File, size int64, prot int) []byte {
	tb.Helper()
	m, err := unix.Mmap(fileFd(f), 0, int(size), prot, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { unix.Munmap(m) })
	return m
}

// drain reads and discards everything from c with a large buffer until
// EOF or an error, then reports how many bytes it read.
func drain(c *net.TCPConn, done chan<- int64) {
	buf := make([]byte, 4<<20)
	var total int64
	for {
		n, err := c.Read(buf)
		total += int64(n)
		if err != nil {
			done <- total
			return
		}
	}
}

func BenchmarkRead(b *testing.B) {
	f := makeDataFile(b, b.TempDir(), benchFileSize)
	mapping := mmapFile(b, f, benchFileSize, unix.PROT_READ)
	for _, m := range readMethods {
		for _, sc := range benchSizes {
			b.Run(m.name+"/"+sc.name, func(b *testing.B) {
				server, client := tcpPair(b)
				done := make(chan int64, 1)
				go drain(client, done)
				e := newReadEnv(b, f, mapping, server, sc.size)
				gen := newOffsetGen(sc.size, benchFileSize, sc.random, 1)
				b.SetBytes(int64(sc.size))
				b.ReportAllocs()
				b.ResetTimer()
				cpu := startCPU()
				for i := 0; i < b.N; i++ {
					if err := m.fn(e, gen.Next(), sc.size); err != nil {
						b.Fatal(err)
					}
				}
				cpu.stop(b)
				server.Close()
				total := <-done
				client.Close()
				if want := int64(b.N) * int64(replyHeaderLen+sc.size); total != want {
					b.Fatalf("peer read %d bytes, want %d", total, want)
				}
			})
		}
	}
}

// TestReadMethods checks that every read candidate sends exactly the reply
// header followed by the file's bytes.
func TestReadMethods(t *testing.T) {
	const size = 8 << 20
	f := makeDataFile(t, t.TempDir(), size)
	mapping := mmapFile(t, f, size, unix.PROT_READ)
	want := make([]byte, size)
	if _, err := f.ReadAt(want, 0); err != nil {
		t.Fatal(err)
	}
	type req struct {
		off int64
		n   int
	}
	reqs := []req{{0, 4096}, {4096 * 7, 4096}, {size - 4096, 4096}, {0, 1 << 20}, {3 << 20, 1 << 20},
		{size - 1<<20, 1 << 20}, {12345, 3 << 20}, {size - 100, 100}}
	for _, m := range readMethods[1:] { // not the NoFileWrite baseline
		t.Run(m.name, func(t *testing.T) {
			server, client := tcpPair(t)
			defer client.Close()
			e := newReadEnv(t, f, mapping, server, 3<<20)
			errc := make(chan error, 1)
			go func() {
				defer server.Close()
				for _, r := range reqs {
					if err := m.fn(e, r.off, r.n); err != nil {
						errc <- err
						return
					}
				}
				errc <- nil
			}()
			hdr := make([]byte, replyHeaderLen)
			for i, r := range reqs {
				if _, err := io.ReadFull(client, hdr); err != nil {
					t.Fatalf("request %d: read header: %v", i, err)
				}
				if binary.BigEndian.Uint32(hdr) != replyMagic || binary.BigEndian.Uint64(hdr[8:]) != uint64(i+1) {
					t.Fatalf("request %d: bad header %x", i, hdr)
				}
				got := make([]byte, r.n)
				if _, err := io.ReadFull(client, got); err != nil {
					t.Fatalf("request %d: read data: %v", i, err)
				}
				if !bytes.Equal(got, want[r.off:r.off+int64(r.n)]) {
					t.Fatalf("request %d: data differs from the file", i)
				}
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			if n, err := client.Read(hdr); n != 0 || !errors.Is(err, io.EOF) {
				t.Fatalf("trailing bytes after the last reply: n=%d err=%v", n, err)
			}
		})
	}
}
