package mirror_test

// Stand-ins for the C flexnbd 0.5.0, the version running in the fleets we
// migrate between: its `listen` (a migration destination) and its mirror
// (a migration source), as its manual and its traffic show them. They
// speak the wire format from their own constants, not through package
// nbd, so that a mistake there cannot hide on both sides of a test.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/server"
	"github.com/flexnbd/flexnbd/sparse"
)

// The C flexnbd's side of the wire.
const (
	cMagicPasswd  = "NBDMAGIC"
	cMagicOld     = 0x0000420281861253
	cMagicRequest = 0x25609513
	cMagicReply   = 0x67446698
	// HAS_FLAGS, SEND_FLUSH, SEND_FUA: nothing else is offered.
	cFlags        = 0x0D
	cGreetingSize = 8 + 8 + 8 + 4 + 124
	cHeaderSize   = 28
	cReplySize    = 16
	cFlagFUA      = 1 << 0

	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdWriteZeroes = 6
	cmdBlockStatus = 7

	errEINVAL  = 22
	errENOSPC  = 28
	errEBADMSG = 74

	// cBlock is the resolution at which the C receiver keeps holes.
	cBlock = 4096
	// cMirrorChunk is what the C mirror sends per WRITE.
	cMirrorChunk = 8 << 20
)

// cListen stands in for `flexnbd listen`: it serves one connection at a
// time with the oldstyle greeting, READ, WRITE, FLUSH and DISC, and ends
// when a DISC arrives (the migration is complete; the C listen exits).
// Blocks of zeroes are not written where the file reads as zeroes
// already, so its file stays sparse as the C receiver's does. Any other
// command gets EINVAL, a request beyond the end ENOSPC (a write's payload
// is drained and the connection kept), and a request with a bad magic
// one EBADMSG reply carrying its handle before the connection is closed.
// The real listen also takes that bad magic for a completed migration and
// exits; the stand-in leaves that bug out, as our source never sends one.
type cListen struct {
	f    *os.File
	size uint64
	l    net.Listener
	// dropAfter, when positive, makes the first connection close without
	// a reply on receiving its dropAfter-th WRITE, unapplied: the network
	// failing mid-copy.
	dropAfter int
	done      chan struct{} // closed on DISC
	served    chan struct{} // closed when the accept loop has ended

	mu      sync.Mutex
	cur     net.Conn
	cmds    map[uint16]int // command type -> requests received
	writes  int
	conns   int
	dropped bool
}

// startCListen serves path, which must exist, until the test ends or a
// DISC arrives.
func startCListen(t testing.TB, path string, dropAfter int) *cListen {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	require.NoError(t, err)
	st, err := f.Stat()
	require.NoError(t, err)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	s := &cListen{
		f:         f,
		size:      uint64(st.Size()) &^ 511,
		l:         l,
		dropAfter: dropAfter,
		done:      make(chan struct{}),
		served:    make(chan struct{}),
		cmds:      map[uint16]int{},
	}
	go s.run()
	t.Cleanup(func() {
		l.Close()
		s.mu.Lock()
		if s.cur != nil {
			s.cur.Close()
		}
		s.mu.Unlock()
		<-s.served
		f.Close()
	})
	return s
}

func (s *cListen) addr() string { return s.l.Addr().String() }

func (s *cListen) run() {
	defer close(s.served)
	for {
		nc, err := s.l.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.cur = nc
		s.conns++
		s.mu.Unlock()
		complete := s.serve(nc)
		nc.Close()
		s.mu.Lock()
		s.cur = nil
		s.mu.Unlock()
		if complete {
			s.l.Close()
			close(s.done)
			return
		}
	}
}

// serve runs one connection; it reports whether it ended with DISC.
func (s *cListen) serve(nc net.Conn) bool {
	g := make([]byte, 0, cGreetingSize)
	g = append(g, cMagicPasswd...)
	g = binary.BigEndian.AppendUint64(g, cMagicOld)
	g = binary.BigEndian.AppendUint64(g, s.size)
	g = binary.BigEndian.AppendUint32(g, cFlags)
	g = append(g, make([]byte, 124)...)
	if _, err := nc.Write(g); err != nil {
		return false
	}
	br := bufio.NewReaderSize(nc, 256<<10)
	var h [cHeaderSize]byte
	var buf []byte
	for {
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return false
		}
		magic := binary.BigEndian.Uint32(h[0:4])
		flags := binary.BigEndian.Uint16(h[4:6])
		typ := binary.BigEndian.Uint16(h[6:8])
		handle := h[8:16]
		from := binary.BigEndian.Uint64(h[16:24])
		length := binary.BigEndian.Uint32(h[24:28])
		if magic != cMagicRequest {
			cReply(nc, errEBADMSG, handle, nil)
			return false
		}
		s.mu.Lock()
		s.cmds[typ]++
		s.mu.Unlock()
		end := from + uint64(length)
		inRange := end >= from && end <= s.size
		switch typ {
		case cmdRead:
			if !inRange {
				cReply(nc, errENOSPC, handle, nil)
				continue
			}
			buf = grow(buf, int(length))
			if _, err := s.f.ReadAt(buf, int64(from)); err != nil {
				return false
			}
			if cReply(nc, 0, handle, buf) != nil {
				return false
			}
		case cmdWrite:
			if !inRange {
				if _, err := br.Discard(int(length)); err != nil {
					return false
				}
				cReply(nc, errENOSPC, handle, nil)
				continue
			}
			buf = grow(buf, int(length))
			if _, err := io.ReadFull(br, buf); err != nil {
				return false
			}
			s.mu.Lock()
			s.writes++
			drop := s.dropAfter > 0 && !s.dropped && s.writes == s.dropAfter
			s.dropped = s.dropped || drop
			s.mu.Unlock()
			if drop {
				return false
			}
			if err := s.writeNotZeroes(buf, from); err != nil {
				return false
			}
			if flags&cFlagFUA != 0 {
				if err := s.f.Sync(); err != nil {
					return false
				}
			}
			if cReply(nc, 0, handle, nil) != nil {
				return false
			}
		case cmdFlush:
			if err := s.f.Sync(); err != nil {
				return false
			}
			if cReply(nc, 0, handle, nil) != nil {
				return false
			}
		case cmdDisc:
			return true
		default:
			if cReply(nc, errEINVAL, handle, nil) != nil {
				return false
			}
		}
	}
}

// writeNotZeroes writes p at off, leaving out every block of zeroes that
// lands where the file reads as zeroes already.
func (s *cListen) writeNotZeroes(p []byte, off uint64) error {
	var have [cBlock]byte
	pending := 0 // start in p of what is still to be written
	for i := 0; i < len(p); {
		n := min(cBlock-int((off+uint64(i))%cBlock), len(p)-i)
		if sparse.IsZero(p[i : i+n]) {
			if _, err := s.f.ReadAt(have[:n], int64(off)+int64(i)); err != nil {
				return err
			}
			if sparse.IsZero(have[:n]) {
				if _, err := s.f.WriteAt(p[pending:i], int64(off)+int64(pending)); err != nil {
					return err
				}
				pending = i + n
			}
		}
		i += n
	}
	_, err := s.f.WriteAt(p[pending:], int64(off)+int64(pending))
	return err
}

func grow(b []byte, n int) []byte {
	if cap(b) < n {
		return make([]byte, n)
	}
	return b[:n]
}

// cReply sends one simple reply, followed by data for a READ.
func cReply(w io.Writer, errno uint32, handle, data []byte) error {
	b := make([]byte, 0, cReplySize+len(data))
	b = binary.BigEndian.AppendUint32(b, cMagicReply)
	b = binary.BigEndian.AppendUint32(b, errno)
	b = append(b, handle...)
	_, err := w.Write(append(b, data...))
	return err
}

// waitDISC waits until the stand-in received the DISC that completes the
// migration.
func (s *cListen) waitDISC(t testing.TB) {
	t.Helper()
	select {
	case <-s.done:
	case <-time.After(testTimeout):
		t.Fatal("the C listen stand-in never received DISC")
	}
}

// commands returns how many requests of each type arrived so far.
func (s *cListen) commands() map[uint16]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	m := make(map[uint16]int, len(s.cmds))
	for k, v := range s.cmds {
		m[k] = v
	}
	return m
}

func (s *cListen) connections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conns
}

// cRequest encodes a request header as the C mirror sends it.
func cRequest(typ, flags uint16, handle, from uint64, length uint32) []byte {
	b := binary.BigEndian.AppendUint32(nil, cMagicRequest)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, handle)
	b = binary.BigEndian.AppendUint64(b, from)
	return binary.BigEndian.AppendUint32(b, length)
}

// cReadGreeting reads an oldstyle greeting and returns the export size.
func cReadGreeting(r io.Reader) (uint64, error) {
	g := make([]byte, cGreetingSize)
	if _, err := io.ReadFull(r, g); err != nil {
		return 0, fmt.Errorf("greeting: %w", err)
	}
	if string(g[:8]) != cMagicPasswd || binary.BigEndian.Uint64(g[8:16]) != cMagicOld {
		return 0, fmt.Errorf("not an oldstyle greeting: %x", g[:16])
	}
	return binary.BigEndian.Uint64(g[16:24]), nil
}

// cReadReply reads one simple reply header: its error and handle.
func cReadReply(r io.Reader) (errno uint32, handle uint64, err error) {
	var b [cReplySize]byte
	if _, err := io.ReadFull(r, b[:]); err != nil {
		return 0, 0, err
	}
	if m := binary.BigEndian.Uint32(b[:4]); m != cMagicReply {
		return 0, 0, fmt.Errorf("bad reply magic %#x", m)
	}
	return binary.BigEndian.Uint32(b[4:8]), binary.BigEndian.Uint64(b[8:16]), nil
}

// errCMirrorStopped: the C mirror stand-in went away mid-copy as asked.
var errCMirrorStopped = errors.New("C mirror stand-in stopped mid-copy")

// cMirror stands in for the C flexnbd's mirror: it checks the oldstyle
// greeting's size against its file, sends the whole file (holes as data)
// in 8 MiB WRITEs, one at a time, each waiting for its reply, then DISC;
// never FLUSH. With stopAfter > 0 it closes the connection after that
// many WRITEs instead, without DISC, and returns errCMirrorStopped.
func cMirror(ctx context.Context, addr, path string, stopAfter int) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	size := uint64(st.Size()) &^ 511
	var d net.Dialer
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer nc.Close()
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { nc.Close() })
	defer stop()
	got, err := cReadGreeting(nc)
	if err != nil {
		return err
	}
	if got != size {
		return fmt.Errorf("remote size %d does not match local size %d", got, size)
	}
	buf := make([]byte, cMirrorChunk)
	writes := 0
	for off := uint64(0); off < size; off += cMirrorChunk {
		p := buf[:min(cMirrorChunk, size-off)]
		if _, err := f.ReadAt(p, int64(off)); err != nil {
			return err
		}
		handle := uint64(writes) + 1
		if _, err := nc.Write(append(cRequest(cmdWrite, 0, handle, off, uint32(len(p))), p...)); err != nil {
			return fmt.Errorf("write at %d: %w", off, err)
		}
		errno, h, err := cReadReply(nc)
		switch {
		case err != nil:
			return fmt.Errorf("reply to write at %d: %w", off, err)
		case errno != 0 || h != handle:
			return fmt.Errorf("write at %d: error %d, handle %d (sent %d)", off, errno, h, handle)
		}
		writes++
		if writes == stopAfter {
			return errCMirrorStopped
		}
	}
	if _, err := nc.Write(cRequest(cmdDisc, 0, 0, 0, 0)); err != nil {
		return fmt.Errorf("disc: %w", err)
	}
	return nil
}

// watchedDestination passes every session end on to the test, after the
// Destination has seen it.
type watchedDestination struct {
	*mirror.Destination
	ended chan server.SessionEnd
}

func (w watchedDestination) Ended(e server.SessionEnd) {
	w.Destination.Ended(e)
	w.ended <- e
}

// goListen serves a new sparse file of size bytes as our migration
// destination, oldstyle like the C listen or newstyle, and reports each
// session end on the channel it returns.
func goListen(t testing.TB, size int64, oldstyle bool) (*testserver.Instance, *mirror.Destination, <-chan server.SessionEnd) {
	t.Helper()
	d := &mirror.Destination{Oldstyle: oldstyle, Logger: testLogger(t)}
	w := watchedDestination{Destination: d, ended: make(chan server.SessionEnd, 64)}
	inst := testserver.Start(t, testserver.Options{
		Path:   makeFile(t, size, nil),
		Config: server.Config{Sessions: w, Oldstyle: oldstyle},
	})
	return inst, d, w.ended
}

func nextEnd(t testing.TB, ended <-chan server.SessionEnd) server.SessionEnd {
	t.Helper()
	select {
	case e := <-ended:
		return e
	case <-time.After(testTimeout):
		t.Fatal("the destination never saw the session end")
		return server.SessionEnd{}
	}
}

// startMirror starts a migration that the test stops when it ends.
func startMirror(t testing.TB, cfg mirror.Config) *mirror.Mirror {
	t.Helper()
	m, err := mirror.Start(testCtx(t), cfg)
	require.NoError(t, err)
	t.Cleanup(func() { m.Break() })
	return m
}

// dialOldstyle connects to an oldstyle server and reads its greeting.
func dialOldstyle(t testing.TB, addr string) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	require.NoError(t, nc.SetDeadline(time.Now().Add(testTimeout)))
	_, err = cReadGreeting(nc)
	require.NoError(t, err)
	return nc
}

// dialNewstyle negotiates with a fixed-newstyle server by hand (only
// EXPORT_NAME, so replies stay simple) and returns the connection in the
// transmission phase.
func dialNewstyle(t testing.TB, addr, name string) net.Conn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	require.NoError(t, nc.SetDeadline(time.Now().Add(testTimeout)))
	g := make([]byte, 18)
	_, err = io.ReadFull(nc, g)
	require.NoError(t, err)
	require.Equal(t, "NBDMAGICIHAVEOPT", string(g[:16]))
	const fixedNewstyle, noZeroes = 1, 2
	require.Equal(t, uint16(fixedNewstyle|noZeroes), binary.BigEndian.Uint16(g[16:])&(fixedNewstyle|noZeroes))
	b := binary.BigEndian.AppendUint32(nil, fixedNewstyle|noZeroes)
	b = append(b, "IHAVEOPT"...)
	b = binary.BigEndian.AppendUint32(b, 1) // NBD_OPT_EXPORT_NAME
	b = binary.BigEndian.AppendUint32(b, uint32(len(name)))
	b = append(b, name...)
	_, err = nc.Write(b)
	require.NoError(t, err)
	_, err = io.ReadFull(nc, make([]byte, 8+2)) // size, transmission flags
	require.NoError(t, err)
	return nc
}

// readUntilClosed returns what the server sent before it closed nc.
func readUntilClosed(t testing.TB, nc net.Conn) []byte {
	t.Helper()
	b, err := io.ReadAll(nc)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the server kept the connection open")
	}
	// A reset is a close too: the server went with our bytes unread.
	return b
}
