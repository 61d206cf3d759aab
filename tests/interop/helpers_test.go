package interop

import (
	"bytes"
	"hash/fnv"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/server"
)

// toolTimeout bounds one run of an external client; the largest transfer
// here (64 MiB over loopback) takes a second or two.
const toolTimeout = 90 * time.Second

// randomBytes returns n bytes that differ from test to test but are the
// same on every run of one test, so a failure can be reproduced.
func randomBytes(t testing.TB, n int) []byte {
	h := fnv.New64a()
	h.Write([]byte(t.Name()))
	r := rand.New(rand.NewChaCha8(seedFrom(h.Sum64())))
	b := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		v := r.Uint64() | 1 // never a whole zero word, so data never looks like a hole
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	for i := n &^ 7; i < n; i++ {
		b[i] = byte(r.Uint32()) | 1
	}
	return b
}

func seedFrom(v uint64) [32]byte {
	var s [32]byte
	for i := range s {
		s[i] = byte(v >> (8 * (i % 8)))
		v = v*6364136223846793005 + 1442695040888963407
	}
	return s
}

// span is a byte range of a test image.
type span struct{ off, len int64 }

// sparseImage creates a sparse file of size bytes whose only allocated
// parts are the given spans, filled with random non-zero data. It returns
// the path and the whole image's expected contents.
func sparseImage(t testing.TB, size int64, data []span) (string, []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "layout.img")
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, f.Truncate(size))
	want := make([]byte, size)
	fill := randomBytes(t, int(size))
	for _, s := range data {
		copy(want[s.off:s.off+s.len], fill[s.off:s.off+s.len])
		_, err := f.WriteAt(want[s.off:s.off+s.len], s.off)
		require.NoError(t, err)
	}
	require.NoError(t, f.Sync())
	return path, want
}

// writeTemp stores b in a new file of the test's temporary directory.
func writeTemp(t testing.TB, name string, b []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	require.NoError(t, os.WriteFile(path, b, 0o644))
	return path
}

// allocated is the space the file system has given path, in bytes:
// what tells a hole from data that happens to be zero.
func allocated(t testing.TB, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	require.NoError(t, syscall.Stat(path, &st))
	return st.Blocks * 512
}

// readRange returns length bytes of path from off, read straight from the
// file so that a test sees what the server stored, not what it answers.
func readRange(t testing.TB, path string, off, length int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	b := make([]byte, length)
	_, err = f.ReadAt(b, off)
	require.NoError(t, err)
	return b
}

// requireSame compares large buffers without printing megabytes on failure.
func requireSame(t testing.TB, want, got []byte, what string) {
	t.Helper()
	require.Equal(t, len(want), len(got), "%s: length", what)
	if !bytes.Equal(want, got) {
		i := 0
		for i < len(want) && want[i] == got[i] {
			i++
		}
		t.Fatalf("%s: first difference at byte %d (want %#02x, got %#02x)", what, i, want[i], got[i])
	}
}

// qemuIO runs qemu-io on the export with one -c per command and fails the
// test if any command failed. qemu-io reports a pattern mismatch as a
// line of output and, in some versions, still exits 0, so the output is
// checked as well as the status. The writeback cache mode keeps qemu-io
// from adding FUA to every write (its default is writethrough), so FUA
// reaches the server only from `write -f`.
func qemuIO(t testing.TB, uri string, cmds ...string) string {
	t.Helper()
	args := []string{"-f", "raw", "-t", "writeback"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, uri)
	out := testserver.Run(t, toolTimeout, testserver.Tool(t, "qemu-io"), args...)
	for _, bad := range []string{"failed", "error", "Error"} {
		require.NotContains(t, out, bad, "qemu-io %s", strings.Join(args, " "))
	}
	return out
}

// op is one call that reached the server's backend.
type op struct {
	kind         string // write, zero, trim, sync
	off, length  uint64
	fua, noHole  bool
	fastZeroOnly bool
}

// recorder is the real file backend with a log of the calls the server
// made: it shows which NBD flags a client's command arrived with.
type recorder struct {
	*server.File
	mu  sync.Mutex
	ops []op
}

func (r *recorder) add(o op) {
	r.mu.Lock()
	r.ops = append(r.ops, o)
	r.mu.Unlock()
}

func (r *recorder) WriteAt(p []byte, off uint64, fua bool) error {
	r.add(op{kind: "write", off: off, length: uint64(len(p)), fua: fua})
	return r.File.WriteAt(p, off, fua)
}

func (r *recorder) Zero(off, length uint64, noHole, fastOnly bool) error {
	r.add(op{kind: "zero", off: off, length: length, noHole: noHole, fastZeroOnly: fastOnly})
	return r.File.Zero(off, length, noHole, fastOnly)
}

func (r *recorder) Trim(off, length uint64) error {
	r.add(op{kind: "trim", off: off, length: length})
	return r.File.Trim(off, length)
}

func (r *recorder) Sync() error {
	r.add(op{kind: "sync"})
	return r.File.Sync()
}

// take returns the calls recorded so far and forgets them.
func (r *recorder) take() []op {
	r.mu.Lock()
	defer r.mu.Unlock()
	ops := r.ops
	r.ops = nil
	return ops
}

// find returns the recorded calls of one kind.
func find(ops []op, kind string) []op {
	var out []op
	for _, o := range ops {
		if o.kind == kind {
			out = append(out, o)
		}
	}
	return out
}

// recordingServer serves a new sparse file of size bytes through a
// recorder and returns both, plus the file's path.
func recordingServer(t testing.TB, size int64, cfg server.Config) (*testserver.Instance, *recorder, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "export.img")
	require.NoError(t, os.WriteFile(path, nil, 0o644))
	require.NoError(t, os.Truncate(path, size))
	f, err := server.OpenFile(path, cfg.ReadOnly)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	rec := &recorder{File: f}
	cfg.Backend = rec
	inst := testserver.Start(t, testserver.Options{Config: cfg})
	return inst, rec, path
}
