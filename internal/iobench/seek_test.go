//go:build linux

package iobench

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

const (
	seekData = unix.SEEK_DATA // 3
	seekHole = unix.SEEK_HOLE // 4

	// The sparse file has one 4 KiB data block every sparseStride bytes.
	sparseStride = 1 << 20
)

// makeSparseFile creates a benchFileSize file that is a hole except for
// 4 KiB of data at the start of every sparseStride bytes.
func makeSparseFile(tb testing.TB, dir string) *os.File {
	tb.Helper()
	f, err := os.OpenFile(filepath.Join(dir, "sparse.img"), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { f.Close() })
	if err := f.Truncate(benchFileSize); err != nil {
		tb.Fatal(err)
	}
	p := make([]byte, 4096)
	fillRandom(p, 5)
	for off := int64(0); off < benchFileSize; off += sparseStride {
		if _, err := f.WriteAt(p, off); err != nil {
			tb.Fatal(err)
		}
	}
	if err := f.Sync(); err != nil {
		tb.Fatal(err)
	}
	return f
}

// seekAt does one lseek and checks the answer is plausible. ENXIO
// (SEEK_DATA past the last data) is a valid answer.
func seekAt(fd int, off int64, whence int) (int64, error) {
	pos, err := unix.Seek(fd, off, whence)
	if err == unix.ENXIO {
		return -1, nil
	}
	return pos, err
}

func BenchmarkSeek(b *testing.B) {
	dir := b.TempDir()
	files := []struct {
		name string
		f    *os.File
	}{
		{"Allocated", makeDataFile(b, dir, benchFileSize)},
		{"Sparse", makeSparseFile(b, dir)},
	}
	whences := []struct {
		name   string
		whence int
	}{{"SEEK_DATA", seekData}, {"SEEK_HOLE", seekHole}}
	for _, file := range files {
		for _, w := range whences {
			b.Run(file.name+"/"+w.name, func(b *testing.B) {
				fd := fileFd(file.f)
				// Offsets at any 512-byte boundary, so that sparse-file
				// probes land in holes and in data.
				gen := newOffsetGen(512, benchFileSize, true, 4)
				b.ResetTimer()
				cpu := startCPU()
				for i := 0; i < b.N; i++ {
					if _, err := seekAt(fd, gen.Next(), w.whence); err != nil {
						b.Fatal(err)
					}
				}
				cpu.stop(b)
			})
		}
	}
}

// TestSeek checks SEEK_DATA/SEEK_HOLE answers on both kinds of file, so the
// benchmark measures real hole detection (on a file system that lacks it,
// the kernel reports the whole file as data).
func TestSeek(t *testing.T) {
	dir := t.TempDir()
	sparse := makeSparseFile(t, dir)
	fd := fileFd(sparse)
	if pos, err := seekAt(fd, 0, seekHole); err != nil || pos != 4096 {
		t.Skipf("file system does not report holes: SEEK_HOLE(0) = %d, %v", pos, err)
	}
	if pos, err := seekAt(fd, 4096, seekData); err != nil || pos != sparseStride {
		t.Fatalf("SEEK_DATA(4096) = %d, %v; want %d", pos, err, sparseStride)
	}
	if pos, err := seekAt(fd, benchFileSize-4096, seekData); err != nil || pos != -1 {
		t.Fatalf("SEEK_DATA past last data = %d, %v; want ENXIO", pos, err)
	}
}
