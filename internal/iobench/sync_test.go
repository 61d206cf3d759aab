//go:build linux

package iobench

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

const syncFileSize = 64 << 20

type syncMethod struct {
	name string
	fn   func(fd int, p []byte, off int64) error
}

var syncMethods = []syncMethod{
	// Baseline: page cache only, nothing reaches the disk.
	{"PwriteNoSync", func(fd int, p []byte, off int64) error {
		return pwriteFull(fd, p, off)
	}},
	{"PwriteFdatasync", func(fd int, p []byte, off int64) error {
		if err := pwriteFull(fd, p, off); err != nil {
			return err
		}
		return unix.Fdatasync(fd)
	}},
	{"Pwritev2DSYNC", func(fd int, p []byte, off int64) error {
		iov := [][]byte{p}
		for {
			n, err := unix.Pwritev2(fd, iov, off, unix.RWF_DSYNC)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return err
			}
			if n == len(p) {
				return nil
			}
			// Short write: finish it and flush explicitly.
			if err := pwriteFull(fd, p[n:], off+int64(n)); err != nil {
				return err
			}
			return unix.Fdatasync(fd)
		}
	}},
	// NOT durable: writes the data pages and waits for them, but flushes
	// neither metadata nor the device's volatile write cache.
	{"PwriteSyncFileRange", func(fd int, p []byte, off int64) error {
		if err := pwriteFull(fd, p, off); err != nil {
			return err
		}
		return unix.SyncFileRange(fd, off, int64(len(p)),
			unix.SYNC_FILE_RANGE_WAIT_BEFORE|unix.SYNC_FILE_RANGE_WRITE|unix.SYNC_FILE_RANGE_WAIT_AFTER)
	}},
}

// BenchmarkSync measures a 4 KiB write at a random aligned offset of a fully
// allocated file followed by each durability primitive.
func BenchmarkSync(b *testing.B) {
	dir := b.TempDir()
	f := makeDataFile(b, dir, syncFileSize)
	fd := fileFd(f)
	p := make([]byte, 4096)
	fillRandom(p, 9)
	for _, m := range syncMethods {
		b.Run(m.name+"/4KiB", func(b *testing.B) {
			gen := newOffsetGen(len(p), syncFileSize, true, 3)
			b.SetBytes(int64(len(p)))
			b.ResetTimer()
			cpu := startCPU()
			for i := 0; i < b.N; i++ {
				if err := m.fn(fd, p, gen.Next()); err != nil {
					b.Fatal(err)
				}
			}
			cpu.stop(b)
			// Do not let this method's dirty pages be flushed on the
			// next method's clock.
			if err := unix.Fsync(fd); err != nil {
				b.Fatal(err)
			}
		})
	}
}

// TestSyncMethods checks that each primitive writes the data.
func TestSyncMethods(t *testing.T) {
	f, err := os.OpenFile(filepath.Join(t.TempDir(), "f"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for i, m := range syncMethods {
		p := make([]byte, 4096)
		fillRandom(p, byte(i))
		off := int64(i) * 8192
		if err := m.fn(fileFd(f), p, off); err != nil {
			t.Fatalf("%s: %v", m.name, err)
		}
		got := make([]byte, len(p))
		if _, err := f.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if string(got) != string(p) {
			t.Fatalf("%s: data not written", m.name)
		}
	}
}
