package interop

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/server"
)

// TestQemuIOPatterns writes a pattern with qemu-io at offsets that are
// aligned, unaligned and at the very end of the export, reads each back
// through the server and from the file itself, and checks that bytes
// nobody wrote stay zero.
func TestQemuIOPatterns(t *testing.T) {
	const size = 32 << 20
	tests := []struct {
		name   string
		off    int64
		length int64
		fua    bool
	}{
		{"first block", 0, 64 << 10, false},
		{"unaligned sector", 1<<20 + 512, 12345, false},
		{"odd byte", 3<<20 + 7, 1001, false},
		{"last bytes", size - 4096, 4096, false},
		{"fua", 5 << 20, 256 << 10, true},
		{"fua unaligned", 7<<20 + 3, 70000, true},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inst, rec, path := recordingServer(t, size, server.Config{})
			pat := 0x11 * (i + 1)
			w := "write"
			if tc.fua {
				w += " -f"
			}
			qemuIO(t, inst.URI(),
				fmt.Sprintf("%s -P %#x %d %d", w, pat, tc.off, tc.length),
				fmt.Sprintf("read -P %#x %d %d", pat, tc.off, tc.length),
			)
			writes := find(rec.take(), "write")
			require.NotEmpty(t, writes)
			for _, o := range writes {
				assert.Equal(t, tc.fua, o.fua, "FUA flag of a write at %d", o.off)
			}

			got := readRange(t, path, tc.off, tc.length)
			requireSame(t, bytes.Repeat([]byte{byte(pat)}, int(tc.length)), got, "file contents")
			// Around the write nothing changed: the bytes just before
			// and after still read as zero through the server.
			if tc.off > 0 {
				qemuIO(t, inst.URI(), fmt.Sprintf("read -P 0 %d 1", tc.off-1))
			}
			if end := tc.off + tc.length; end < size {
				qemuIO(t, inst.URI(), fmt.Sprintf("read -P 0 %d %d", end, min(size-end, 4096)))
			}
		})
	}
}

// TestQemuIOZeroDiscardFlush covers the commands that change allocation
// rather than data. qemu-io's `write -z` sends WRITE_ZEROES with NO_HOLE
// (the caller did not allow unmapping), `write -z -u` without it, and
// `discard` sends TRIM. The server promises: NO_HOLE keeps the blocks,
// WRITE_ZEROES without it and TRIM free them, and every case reads back as
// zeroes.
func TestQemuIOZeroDiscardFlush(t *testing.T) {
	const (
		size   = 32 << 20
		off    = 4 << 20
		length = 2 << 20
	)
	tests := []struct {
		name      string
		cmd       string
		kind      string // the backend call the command must reach
		noHole    bool
		freesData bool
	}{
		{"write -z keeps allocation", fmt.Sprintf("write -z %d %d", off, length), "zero", true, false},
		{"write -z -u punches", fmt.Sprintf("write -z -u %d %d", off, length), "zero", false, true},
		{"discard punches", fmt.Sprintf("discard %d %d", off, length), "trim", false, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inst, rec, path := recordingServer(t, size, server.Config{})
			qemuIO(t, inst.URI(), fmt.Sprintf("write -P 0xa5 %d %d", off-(1<<20), length+(2<<20)))
			before := allocated(t, path)
			require.GreaterOrEqual(t, before, int64(length+(2<<20)), "the pattern write allocated its blocks")
			rec.take()

			qemuIO(t, inst.URI(), tc.cmd)
			calls := find(rec.take(), tc.kind)
			require.NotEmpty(t, calls, "%q reached the server as %s", tc.cmd, tc.kind)
			var covered uint64
			for _, c := range calls {
				assert.Equal(t, tc.noHole, c.noHole, "NO_HOLE of %s at %d", tc.kind, c.off)
				covered += c.length
			}
			assert.Equal(t, uint64(length), covered)

			after := allocated(t, path)
			if tc.freesData {
				assert.LessOrEqual(t, after, before-length, "the range was deallocated")
			} else {
				assert.GreaterOrEqual(t, after, before, "NO_HOLE kept the range allocated")
			}
			// Zeroes inside, the pattern intact on both sides.
			qemuIO(t, inst.URI(),
				fmt.Sprintf("read -P 0 %d %d", off, length),
				fmt.Sprintf("read -P 0xa5 %d %d", off-(1<<20), 1<<20),
				fmt.Sprintf("read -P 0xa5 %d %d", off+length, 1<<20),
			)
			requireSame(t, make([]byte, length), readRange(t, path, off, length), "file contents")
		})
	}

	t.Run("flush reaches the server", func(t *testing.T) {
		inst, rec, _ := recordingServer(t, size, server.Config{})
		qemuIO(t, inst.URI(), "write -P 0x44 0 65536", "flush", "write -P 0x45 1048576 65536")
		// qemu-io flushes again on exit, so the flush command shows as a
		// sync between the two writes.
		ops := rec.take()
		first, second := -1, -1
		for i, o := range ops {
			switch {
			case o.kind == "write" && o.off == 0:
				first = i
			case o.kind == "write" && o.off == 1<<20:
				second = i
			}
		}
		require.True(t, first >= 0 && second > first, "both writes arrived in order: %+v", ops)
		assert.NotEmpty(t, find(ops[first+1:second], "sync"), "a sync between the writes: %+v", ops)
	})
}

// TestQemuIOAio keeps several requests in flight on one connection, on
// the same region.
func TestQemuIOAio(t *testing.T) {
	const region = 1 << 20

	// Reads racing rewrites of identical data must see that data, never a
	// torn or zeroed state, and every request must complete.
	t.Run("reads race identical rewrites", func(t *testing.T) {
		inst := testserver.Start(t, testserver.Options{Size: 16 << 20})
		qemuIO(t, inst.URI(), fmt.Sprintf("write -P 0x3c 0 %d", region), fmt.Sprintf("write -P 0x7e %d %d", region, region))
		var batch []string
		for i := 0; i < 8; i++ {
			off := i * 64 << 10
			batch = append(batch,
				fmt.Sprintf("aio_write -P 0x3c %d %d", off, 256<<10),
				fmt.Sprintf("aio_read -P 0x3c %d %d", off+32<<10, 128<<10),
				fmt.Sprintf("aio_read -P 0x7e %d %d", region+off, 192<<10),
			)
		}
		batch = append(batch, "aio_flush",
			fmt.Sprintf("read -P 0x3c 0 %d", region),
			fmt.Sprintf("read -P 0x7e %d %d", region, region))
		out := qemuIO(t, inst.URI(), batch...)
		assert.Equal(t, 8, strings.Count(out, "wrote "), out)
		assert.Equal(t, 16+2, strings.Count(out, "read "), out)
	})

	// Overlapping writes of different data: qemu does not promise the
	// order in which it sends them, so the test takes the order in which
	// the server executed them and requires the result of exactly that
	// order, byte for byte, with nothing torn or lost.
	t.Run("overlapping writes serialise", func(t *testing.T) {
		inst, rec, path := recordingServer(t, 16<<20, server.Config{})
		base := int64(2 * region)
		writes := []struct {
			pat      byte
			off, len int64
		}{
			{0x01, base, region},
			{0x02, base + 4096, region / 2},
			{0x03, base + region/2, region / 2},
			{0x04, base + 300001, 400000},
			{0x05, base + 12345, 1000},
			{0x06, base + region - 8192, 8192},
		}
		var batch []string
		for _, w := range writes {
			batch = append(batch, fmt.Sprintf("aio_write -P %#x %d %d", w.pat, w.off, w.len))
		}
		out := qemuIO(t, inst.URI(), append(batch, "aio_flush")...)
		assert.Equal(t, len(writes), strings.Count(out, "wrote "), out)

		want := make([]byte, region)
		applied := 0
		for _, o := range find(rec.take(), "write") {
			found := false
			for _, w := range writes {
				if uint64(w.off) == o.off && uint64(w.len) == o.length {
					copy(want[w.off-base:w.off-base+w.len], bytes.Repeat([]byte{w.pat}, int(w.len)))
					found, applied = true, applied+1
				}
			}
			require.True(t, found, "unexpected write %+v", o)
		}
		require.Equal(t, len(writes), applied)
		requireSame(t, want, readRange(t, path, base, region), "file after overlapping writes")
		got := make([]byte, region)
		require.NoError(t, inst.Dial(t, nil).Read(context.Background(), got, uint64(base), 0))
		requireSame(t, want, got, "read back through the server")
	})
}

// qemuImg runs qemu-img and returns its output.
func qemuImg(t testing.TB, args ...string) string {
	t.Helper()
	return testserver.Run(t, toolTimeout, testserver.Tool(t, "qemu-img"), args...)
}

// TestQemuImg checks qemu-img's view of an export: its size, its map of
// data and holes, and byte-exact compare and convert in both directions.
func TestQemuImg(t *testing.T) {
	t.Run("info", func(t *testing.T) {
		inst := testserver.Start(t, testserver.Options{Size: 48<<20 + 1000})
		var info struct {
			VirtualSize int64 `json:"virtual-size"`
		}
		require.NoError(t, json.Unmarshal([]byte(qemuImg(t, "info", "--output=json", "-f", "raw", inst.URI())), &info))
		// The export is the file rounded down to whole sectors.
		assert.Equal(t, int64(48<<20+512), info.VirtualSize)
	})

	t.Run("map", func(t *testing.T) {
		const size = 16 << 20
		layout := []span{{0, 64 << 10}, {1 << 20, 256 << 10}, {8 << 20, 1 << 20}, {size - 4096, 4096}}
		path, _ := sparseImage(t, size, layout)
		inst := testserver.Start(t, testserver.Options{Path: path})
		var entries []struct {
			Start, Length int64
			Data, Zero    bool
		}
		require.NoError(t, json.Unmarshal([]byte(qemuImg(t, "map", "--output=json", "-f", "raw", inst.URI())), &entries))
		var data []span
		var end int64
		for _, e := range entries {
			require.Equal(t, end, e.Start, "entries are contiguous")
			end = e.Start + e.Length
			assert.Equal(t, !e.Data, e.Zero, "a hole reads as zero, data does not claim to")
			if !e.Data {
				continue
			}
			if n := len(data); n > 0 && data[n-1].off+data[n-1].len == e.Start {
				data[n-1].len += e.Length
			} else {
				data = append(data, span{e.Start, e.Length})
			}
		}
		assert.Equal(t, int64(size), end)
		assert.Equal(t, layout, data)
	})

	t.Run("compare", func(t *testing.T) {
		const size = 8 << 20
		src := randomBytes(t, size)
		local := writeTemp(t, "local.img", src)
		inst := testserver.Start(t, testserver.Options{Path: writeTemp(t, "export.img", src)})
		qemuImg(t, "compare", "-f", "raw", "-F", "raw", local, inst.URI())

		const at = 5<<20 + 123
		qemuIO(t, inst.URI(), fmt.Sprintf("write -P %#x %d 1", src[at]^0xff, at))
		out, err := testserver.RunErr(t, toolTimeout, testserver.Tool(t, "qemu-img"),
			"compare", "-f", "raw", "-F", "raw", local, inst.URI())
		require.Error(t, err, "a one-byte change is found:\n%s", out)
		// qemu-img names the sector where the difference starts.
		assert.Contains(t, out, fmt.Sprintf("offset %d", at&^511))
	})

	t.Run("convert in and out", func(t *testing.T) {
		const size = 32 << 20
		src := randomBytes(t, size)
		srcPath := writeTemp(t, "src.img", src)
		inst := testserver.Start(t, testserver.Options{Size: size})
		qemuImg(t, "convert", "-n", "-f", "raw", "-O", "raw", srcPath, inst.URI())
		requireSame(t, src, readRange(t, inst.Path, 0, size), "export file after convert in")

		out := filepath.Join(t.TempDir(), "out.img")
		qemuImg(t, "convert", "-f", "raw", "-O", "raw", inst.URI(), out)
		got, err := os.ReadFile(out)
		require.NoError(t, err)
		requireSame(t, src, got, "converted out")
		qemuImg(t, "compare", "-f", "raw", "-F", "raw", out, inst.URI())
	})
}
