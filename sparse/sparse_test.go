package sparse

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"
)

func TestIsZero(t *testing.T) {
	big := make([]byte, 3*len(zeroes)+7) // crosses the comparison page
	tests := []struct {
		name string
		buf  []byte
		want bool
	}{
		{"empty", nil, true},
		{"one zero", []byte{0}, true},
		{"one byte", []byte{1}, false},
		{"zeroes beyond the page", big, true},
		{"last byte beyond the page", func() []byte { b := append([]byte(nil), big...); b[len(b)-1] = 1; return b }(), false},
		{"first byte of the second page", func() []byte { b := append([]byte(nil), big...); b[len(zeroes)] = 0x80; return b }(), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, IsZero(tt.buf))
		})
	}
}

type run struct {
	off, len int64
	hole     bool
}

// layout makes a sparse file of size bytes with data written at each
// [off, off+len) of data; the file system decides the exact hole edges, so
// the offsets used are multiples of 1 MiB, above any block size.
func layout(t *testing.T, size int64, data ...[2]int64) (*os.File, int) {
	t.Helper()
	f, err := os.Create(filepath.Join(t.TempDir(), "img"))
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	require.NoError(t, f.Truncate(size))
	for _, d := range data {
		buf := make([]byte, d[1])
		for i := range buf {
			buf[i] = 0xa5
		}
		_, err := f.WriteAt(buf, d[0])
		require.NoError(t, err)
	}
	require.NoError(t, f.Sync())
	return f, int(f.Fd())
}

func walk(t *testing.T, fd int, off, end int64) []run {
	t.Helper()
	var runs []run
	require.NoError(t, Walk(fd, off, end, func(o, n int64, hole bool) bool {
		runs = append(runs, run{o, n, hole})
		return true
	}))
	return runs
}

const mib = 1 << 20

func TestWalk(t *testing.T) {
	_, fd := layout(t, 8*mib, [2]int64{1 * mib, mib}, [2]int64{4 * mib, 2 * mib})
	tests := []struct {
		name     string
		off, end int64
		want     []run
	}{
		{"whole file", 0, 8 * mib, []run{{0, mib, true}, {mib, mib, false}, {2 * mib, 2 * mib, true}, {4 * mib, 2 * mib, false}, {6 * mib, 2 * mib, true}}},
		{"inside data", mib + 100, mib + 200, []run{{mib + 100, 100, false}}},
		{"inside a hole", 2*mib + 5, 3 * mib, []run{{2*mib + 5, mib - 5, true}}},
		{"hole then data, clipped", 3 * mib, 5 * mib, []run{{3 * mib, mib, true}, {4 * mib, mib, false}}},
		{"trailing hole", 6 * mib, 8 * mib, []run{{6 * mib, 2 * mib, true}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			require.Equal(t, tt.want, walk(t, fd, tt.off, tt.end))
		})
	}
	t.Run("stops when told", func(t *testing.T) {
		n := 0
		require.NoError(t, Walk(fd, 0, 8*mib, func(int64, int64, bool) bool { n++; return false }))
		require.Equal(t, 1, n)
	})
}

func TestHasHoles(t *testing.T) {
	_, sparseFd := layout(t, 4*mib, [2]int64{0, mib})
	has, err := HasHoles(sparseFd, 4*mib)
	require.NoError(t, err)
	require.True(t, has)

	_, fullFd := layout(t, 2*mib, [2]int64{0, 2 * mib})
	has, err = HasHoles(fullFd, 2*mib)
	require.NoError(t, err)
	require.False(t, has)

	has, err = HasHoles(fullFd, 0)
	require.NoError(t, err)
	require.False(t, has, "an empty export has nothing to be sparse about")
}

func allocated(t *testing.T, fd int) int64 {
	t.Helper()
	var st unix.Stat_t
	require.NoError(t, unix.Fstat(fd, &st))
	return st.Blocks * 512
}

func TestPunchHoleAndZeroRange(t *testing.T) {
	f, fd := layout(t, 4*mib, [2]int64{0, 4 * mib})
	before := allocated(t, fd)

	require.NoError(t, PunchHole(fd, mib, mib))
	require.Equal(t, []run{{0, mib, false}, {mib, mib, true}, {2 * mib, 2 * mib, false}}, walk(t, fd, 0, 4*mib))
	require.Less(t, allocated(t, fd), before, "a punched hole frees blocks")

	afterPunch := allocated(t, fd)
	require.NoError(t, ZeroRange(fd, 2*mib, mib))
	require.Equal(t, afterPunch, allocated(t, fd), "zeroing a range keeps it allocated")

	buf := make([]byte, 3*mib)
	_, err := f.ReadAt(buf, mib)
	require.NoError(t, err)
	require.True(t, IsZero(buf[:2*mib]), "punched and zeroed ranges read as zeroes")
	require.False(t, IsZero(buf[2*mib:]), "data past the zeroed range survives")

	st, err := f.Stat()
	require.NoError(t, err)
	require.Equal(t, int64(4*mib), st.Size(), "the file keeps its size")
	require.NoError(t, PunchHole(fd, 0, 0), "an empty range is a no-op")
}

func TestSize(t *testing.T) {
	_, fd := layout(t, 3*mib+1000)
	size, err := Size(fd)
	require.NoError(t, err)
	require.Equal(t, int64(3*mib+1000), size)

	dir, err := os.Open(t.TempDir())
	require.NoError(t, err)
	defer dir.Close()
	_, err = Size(int(dir.Fd()))
	require.ErrorContains(t, err, "not a regular file or block device")
}
