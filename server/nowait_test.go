package server_test

import (
	"bytes"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Writes that fit in the page cache go in with RWF_NOWAIT where the file
// system takes it for buffered writes (XFS), and the server stops trying
// where it does not (ext4); either way every byte reads back as written.
func TestNoWaitWrites(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("mounting a file system image needs root")
	}
	for _, tc := range []struct {
		fs     string
		noWait bool
	}{
		{"xfs", true},
		{"ext4", false},
	} {
		t.Run(tc.fs, func(t *testing.T) {
			path := filepath.Join(mountImage(t, tc.fs), "disk")
			const size = 8 << 20
			f0, err := os.Create(path)
			require.NoError(t, err)
			require.NoError(t, f0.Truncate(size)) // a hole, so some writes allocate
			require.NoError(t, f0.Close())
			f := openFile(t, path)
			want := make([]byte, size)
			rng := rand.New(rand.NewPCG(1, 2))
			for _, w := range []struct {
				off, n int
				fua    bool
			}{
				{0, 4096, false},
				{3*4096 + 100, 5000, false}, // unaligned, across blocks
				{1 << 20, 1 << 20, false},
				{1<<20 + 4096, 4096, false}, // over data just written
				{2 << 20, 64 << 10, true},   // FUA goes the regular way
				{size - 512, 512, false},
			} {
				p := make([]byte, w.n)
				for i := range p {
					p[i] = byte(rng.IntN(255) + 1) // no block of zeroes
				}
				require.NoError(t, f.WriteAt(p, uint64(w.off), w.fua))
				copy(want[w.off:], p)
			}
			assert.Equal(t, tc.noWait, f.NoWaitWrites(), "RWF_NOWAIT writes still in use")
			got, err := os.ReadFile(path)
			require.NoError(t, err)
			assert.True(t, bytes.Equal(want, got), "the file holds what was written")
		})
	}
}

// mountImage makes a file system of type fs in an image file, mounts it
// on a loop device for the test and returns where.
func mountImage(t *testing.T, fs string) string {
	t.Helper()
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "fs.img"), filepath.Join(dir, "mnt")
	require.NoError(t, os.Mkdir(mnt, 0o755))
	f, err := os.Create(img)
	require.NoError(t, err)
	require.NoError(t, f.Truncate(320<<20)) // XFS's smallest is 300 MiB
	require.NoError(t, f.Close())
	run := func(name string, args ...string) {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		require.NoError(t, err, "%s %v: %s", name, args, out)
	}
	run("mkfs."+fs, "-q", img)
	run("mount", "-o", "loop", img, mnt)
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	return mnt
}
