package server_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// exportSize is the size of the sparse file testserver creates by default.
const exportSize = 64 << 20

// mode is one way a client can talk to the server; most behaviour must be
// the same in all of them.
type mode struct {
	name     string
	oldstyle bool // the C flexnbd's greeting; implies simple replies
	simple   bool // newstyle without structured replies
}

var (
	structuredMode = mode{name: "structured"}
	simpleMode     = mode{name: "simple", simple: true}
	oldstyleMode   = mode{name: "oldstyle", oldstyle: true}
	allModes       = []mode{structuredMode, simpleMode, oldstyleMode}
)

// structured reports whether the session uses structured replies.
func (m mode) structured() bool { return !m.oldstyle && !m.simple }

// start serves an export in mode m; cfg.Oldstyle is set from the mode.
func (m mode) start(t testing.TB, opts testserver.Options) *testserver.Instance {
	t.Helper()
	opts.Config.Oldstyle = m.oldstyle
	return testserver.Start(t, opts)
}

// dial connects a client that negotiates what mode m stands for.
func (m mode) dial(t testing.TB, inst *testserver.Instance) *nbd.Client {
	t.Helper()
	c := inst.Dial(t, &nbd.ClientOptions{NoStructuredReplies: m.simple})
	require.Equal(t, m.oldstyle, c.Session().Oldstyle)
	require.Equal(t, m.structured(), c.Session().Structured)
	return c
}

// testCtx bounds a test's requests so a hang fails instead of stalling.
func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond until it holds, failing the test after a deadline: for
// state the server changes on its own goroutines with no event to wait on.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// pattern returns n pseudo-random bytes, the same for the same seed.
func pattern(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], r.Uint64()|1) // never a zero word
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32()) | 1
	}
	return b
}

// roundTrip writes a fresh pattern at off and reads it back: proof that a
// connection is still in step with the server.
func roundTrip(t testing.TB, c *nbd.Client, off uint64, seed uint64) {
	t.Helper()
	ctx := testCtx(t)
	want := pattern(seed, 4096)
	require.NoError(t, c.Write(ctx, want, off, 0), "write after the error")
	got := make([]byte, len(want))
	require.NoError(t, c.Read(ctx, got, off, 0), "read after the error")
	require.True(t, bytes.Equal(want, got), "data read back differs from data written")
}

// newSparseFile creates a sparse file of size bytes.
func newSparseFile(t testing.TB, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "export.img")
	f, err := os.Create(path)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(size))
	require.NoError(t, f.Close())
	return path
}

// openFile opens path as a server.File closed at the end of the test.
func openFile(t testing.TB, path string) *server.File {
	t.Helper()
	f, err := server.OpenFile(path, false)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	return f
}

// writeFileAt writes p at off of the file at path, behind the server's back.
func writeFileAt(path string, p []byte, off int64) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.WriteAt(p, off); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// allocatedBytes is what the file system has allocated for path.
func allocatedBytes(t testing.TB, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	require.NoError(t, unix.Stat(path, &st))
	return st.Blocks * 512
}

// isHole reports whether [off, off+n) of path holds no data.
func isHole(t testing.TB, path string, off, n int64) bool {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
	if errors.Is(err, unix.ENXIO) {
		return true
	}
	require.NoError(t, err)
	return data >= off+n
}

// testBackend wraps a real backend; each non-nil function replaces the
// method of the same name, so a test can fail, stall or count calls.
type testBackend struct {
	server.Backend
	read  func(p []byte, off uint64, nowait bool) error
	write func(p []byte, off uint64, fua bool) error
	sync  func() error
	trim  func(off, length uint64) error
	zero  func(off, length uint64, noHole, fastOnly bool) error
}

func (b *testBackend) ReadAt(p []byte, off uint64, nowait bool) error {
	if b.read != nil {
		return b.read(p, off, nowait)
	}
	return b.Backend.ReadAt(p, off, nowait)
}

func (b *testBackend) WriteAt(p []byte, off uint64, fua bool) error {
	if b.write != nil {
		return b.write(p, off, fua)
	}
	return b.Backend.WriteAt(p, off, fua)
}

func (b *testBackend) Sync() error {
	if b.sync != nil {
		return b.sync()
	}
	return b.Backend.Sync()
}

func (b *testBackend) Trim(off, length uint64) error {
	if b.trim != nil {
		return b.trim(off, length)
	}
	return b.Backend.Trim(off, length)
}

func (b *testBackend) Zero(off, length uint64, noHole, fastOnly bool) error {
	if b.zero != nil {
		return b.zero(off, length, noHole, fastOnly)
	}
	return b.Backend.Zero(off, length, noHole, fastOnly)
}

// wrapFile returns a testBackend over a new sparse file of exportSize.
func wrapFile(t testing.TB) *testBackend {
	t.Helper()
	return &testBackend{Backend: openFile(t, newSparseFile(t, exportSize))}
}

// stall holds backend calls that touch [off, end) until released, the way
// a dying disk would, and counts how many it holds at once.
type stall struct {
	off, end uint64
	entered  chan struct{} // receives once per call that starts waiting
	release  chan struct{}
	once     sync.Once
	inFlight atomic.Int64
	max      atomic.Int64
}

// newStall returns a stall that the end of the test releases, so that no
// request stays stuck past it.
func newStall(t testing.TB, off, end uint64) *stall {
	s := &stall{off: off, end: end, entered: make(chan struct{}, 1024), release: make(chan struct{})}
	t.Cleanup(s.Release)
	return s
}

func (s *stall) covers(off uint64, n int) bool { return off < s.end && s.off < off+uint64(n) }

// hold blocks the calling backend call until Release.
func (s *stall) hold() {
	n := s.inFlight.Add(1)
	for {
		m := s.max.Load()
		if n <= m || s.max.CompareAndSwap(m, n) {
			break
		}
	}
	s.entered <- struct{}{}
	<-s.release
	s.inFlight.Add(-1)
}

// Release lets every held and future call through.
func (s *stall) Release() { s.once.Do(func() { close(s.release) }) }

// releaseBeforeShutdown makes the end of the test release the stall before
// it stops the server started since: a test that fails while calls are
// held must not hang in a shutdown that waits for them.
func (s *stall) releaseBeforeShutdown(t testing.TB) { t.Cleanup(s.Release) }

// awaitEntered waits for n calls to be held.
func (s *stall) awaitEntered(t testing.TB, n int) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for range n {
		select {
		case <-s.entered:
		case <-timeout:
			t.Fatalf("backend calls held: want %d, got %d", n, s.inFlight.Load())
		}
	}
}

// stalledReads returns a backend whose reads of [off, end) stall. A nowait
// read there reports ErrWouldBlock, as a file read missing the page cache
// does, so the server moves the request off its reader.
func stalledReads(t testing.TB, off, end uint64) (*testBackend, *stall) {
	be := wrapFile(t)
	s := newStall(t, off, end)
	be.read = func(p []byte, o uint64, nowait bool) error {
		if s.covers(o, len(p)) {
			if nowait {
				return server.ErrWouldBlock
			}
			s.hold()
		}
		return be.Backend.ReadAt(p, o, nowait)
	}
	return be, s
}

// rawConn speaks NBD by hand, for what our client refuses to do: send
// requests in an exact order without waiting, never read replies, or break
// the protocol. It negotiates with EXPORT_NAME (simple replies only) or
// accepts an oldstyle greeting.
type rawConn struct {
	nc   net.Conn
	br   *bufio.Reader
	size uint64
}

func dialRaw(t testing.TB, addr string) *rawConn {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	t.Cleanup(func() { nc.Close() })
	require.NoError(t, nc.SetDeadline(time.Now().Add(10*time.Second)))
	r := &rawConn{nc: nc, br: bufio.NewReaderSize(nc, 256<<10)}
	var g [16]byte
	_, err = io.ReadFull(r.br, g[:])
	require.NoError(t, err, "read greeting")
	require.Equal(t, "NBDMAGIC", string(g[:8]))
	var info []byte
	if binary.BigEndian.Uint64(g[8:]) == 0x00420281861253 { // oldstyle
		info = make([]byte, 8+4+124)
	} else {
		var hflags [2]byte
		_, err = io.ReadFull(r.br, hflags[:])
		require.NoError(t, err)
		// No flags: a plain newstyle client that may only send EXPORT_NAME
		// and gets the zero padding.
		msg := binary.BigEndian.AppendUint32(nil, 0)
		msg = binary.BigEndian.AppendUint64(msg, 0x49484156454f5054) // IHAVEOPT
		msg = binary.BigEndian.AppendUint32(msg, uint32(nbd.OptExportName))
		msg = binary.BigEndian.AppendUint32(msg, 0)
		_, err = nc.Write(msg)
		require.NoError(t, err)
		info = make([]byte, 8+2+124)
	}
	_, err = io.ReadFull(r.br, info)
	require.NoError(t, err, "read export info")
	r.size = binary.BigEndian.Uint64(info)
	require.NoError(t, nc.SetDeadline(time.Time{}))
	return r
}

// send writes one request and its payload.
func (r *rawConn) send(req nbd.Request, payload []byte) error {
	_, err := (&net.Buffers{nbd.AppendRequest(nil, req), payload}).WriteTo(r.nc)
	return err
}

// reply reads one simple reply header.
func (r *rawConn) reply() (nbd.ReplyHeader, error) {
	var b [nbd.SimpleReplyHeaderSize]byte
	if _, err := io.ReadFull(r.br, b[:]); err != nil {
		return nbd.ReplyHeader{}, err
	}
	return nbd.DecodeReplyHeader(b[:])
}

// tapConn records what the client reads after record is called, so a test
// can look at the exact chunks of a structured reply.
type tapConn struct {
	net.Conn
	mu   sync.Mutex
	on   bool
	tape []byte
}

func (c *tapConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	if c.on {
		c.tape = append(c.tape, p[:n]...)
	}
	c.mu.Unlock()
	return n, err
}

func (c *tapConn) record() {
	c.mu.Lock()
	c.on, c.tape = true, nil
	c.mu.Unlock()
}

func (c *tapConn) stop() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.on = false
	return c.tape
}

// dialTap connects our client through a tapConn.
func dialTap(t testing.TB, addr string) (*nbd.Client, *tapConn) {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	require.NoError(t, err)
	tc := &tapConn{Conn: nc}
	c, err := nbd.NewClient(tc, nil)
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c, tc
}

// chunk is one structured reply chunk as seen on the wire.
type chunk struct {
	flags nbd.ReplyFlags
	typ   nbd.ReplyType
	off   uint64 // content chunks: where in the export
	n     uint64 // content chunks: bytes described
}

// parseChunks splits a recorded reply stream into its chunks.
func parseChunks(t testing.TB, tape []byte) []chunk {
	t.Helper()
	var out []chunk
	for len(tape) > 0 {
		require.GreaterOrEqual(t, len(tape), nbd.ChunkHeaderSize, "truncated chunk header")
		h, err := nbd.DecodeReplyHeader(tape[:nbd.ChunkHeaderSize])
		require.NoError(t, err)
		require.True(t, h.Structured, "simple reply on a structured session")
		tape = tape[nbd.ChunkHeaderSize:]
		require.GreaterOrEqual(t, len(tape), int(h.Length), "truncated chunk payload")
		payload := tape[:h.Length]
		tape = tape[h.Length:]
		c := chunk{flags: h.Flags, typ: h.Type}
		switch h.Type {
		case nbd.ReplyTypeOffsetData:
			c.off = binary.BigEndian.Uint64(payload)
			c.n = uint64(len(payload) - 8)
		case nbd.ReplyTypeOffsetHole:
			c.off = binary.BigEndian.Uint64(payload)
			c.n = uint64(binary.BigEndian.Uint32(payload[8:]))
		}
		out = append(out, c)
	}
	return out
}
