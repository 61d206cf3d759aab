package mirror_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/server"
)

// testTimeout guards every wait so that a bug fails instead of hanging.
const testTimeout = 60 * time.Second

func testCtx(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

func testLogger(t testing.TB) zerolog.Logger {
	if os.Getenv("FLEXNBD_TEST_LOG") != "" {
		return zerolog.New(zerolog.NewTestWriter(t)).Level(zerolog.DebugLevel)
	}
	return zerolog.Nop()
}

// makeFile creates a sparse file of size bytes and writes data at each
// offset of fill.
func makeFile(t testing.TB, size int64, fill map[int64][]byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(path)
	require.NoError(t, err)
	defer f.Close()
	require.NoError(t, f.Truncate(size))
	for off, p := range fill {
		_, err := f.WriteAt(p, off)
		require.NoError(t, err)
	}
	return path
}

func random(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	p := make([]byte, n)
	for i := 0; i+8 <= n; i += 8 {
		binary.LittleEndian.PutUint64(p[i:], r.Uint64())
	}
	return p
}

// source serves path and returns the instance and its Export.
func source(t testing.TB, path string) (*testserver.Instance, mirror.Export) {
	t.Helper()
	inst := testserver.Start(t, testserver.Options{Path: path})
	return inst, mirror.ServedExport{Server: inst.Server, Backend: inst.File}
}

// destination serves a new sparse file of size bytes as a migration
// destination.
func destination(t testing.TB, size int64, d *mirror.Destination) *testserver.Instance {
	t.Helper()
	d.Logger = testLogger(t)
	return testserver.Start(t, testserver.Options{
		Path:   makeFile(t, size, nil),
		Config: server.Config{Sessions: d, Oldstyle: d.Oldstyle},
	})
}

// config is a mirror configuration with short timeouts for tests.
func config(t testing.TB, exp mirror.Export, target string) mirror.Config {
	return mirror.Config{
		Export:          exp,
		Target:          target,
		Finish:          mirror.FinishNothing,
		RequestTimeout:  5 * time.Second,
		GreetingTimeout: 2 * time.Second,
		RetryMin:        20 * time.Millisecond,
		RetryMax:        200 * time.Millisecond,
		Logger:          testLogger(t),
	}
}

func waitDone(t testing.TB, m *mirror.Mirror) error {
	t.Helper()
	select {
	case <-m.Done():
		return m.Err()
	case <-time.After(testTimeout):
		t.Fatalf("migration did not end; status %+v", m.Status())
		return nil
	}
}

func waitComplete(t testing.TB, d *mirror.Destination) {
	t.Helper()
	select {
	case <-d.Complete():
	case <-time.After(testTimeout):
		t.Fatal("destination never completed")
	}
}

// requireSameFiles compares two files byte by byte.
func requireSameFiles(t testing.TB, a, b string) {
	t.Helper()
	pa, err := os.ReadFile(a)
	require.NoError(t, err)
	pb, err := os.ReadFile(b)
	require.NoError(t, err)
	require.Equal(t, len(pa), len(pb))
	if !bytes.Equal(pa, pb) {
		for i := range pa {
			if pa[i] != pb[i] {
				t.Fatalf("files differ first at byte %d (block %d)", i, i/4096)
			}
		}
	}
}

func allocated(t testing.TB, path string) int64 {
	var st unix.Stat_t
	require.NoError(t, unix.Stat(path, &st))
	return st.Blocks * 512
}

// eventually polls cond until it holds, failing the test after testTimeout:
// for state that changes on other goroutines with no event to wait on.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}
