package interop

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/server"
)

// nbdinfoExport is the part of `nbdinfo --json` the tests look at.
type nbdinfoExport struct {
	Size         int64    `json:"export-size"`
	Contexts     []string `json:"contexts"`
	ReadOnly     bool     `json:"is_read_only"`
	CanCache     bool     `json:"can_cache"`
	CanDF        bool     `json:"can_df"`
	CanFastZero  bool     `json:"can_fast_zero"`
	CanFlush     bool     `json:"can_flush"`
	CanFUA       bool     `json:"can_fua"`
	CanMultiConn bool     `json:"can_multi_conn"`
	CanTrim      bool     `json:"can_trim"`
	CanZero      bool     `json:"can_zero"`
	MinBlock     int64    `json:"block_size_minimum"`
	PrefBlock    int64    `json:"block_size_preferred"`
	MaxBlock     int64    `json:"block_size_maximum"`
}

// TestNbdinfoJSON checks what libnbd learns in the handshake: every
// capability the server implements, the block sizes it announces, and
// read-only exports marked as such.
func TestNbdinfoJSON(t *testing.T) {
	tests := []struct {
		name     string
		readOnly bool
	}{
		{"read-write", false},
		{"read-only", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			inst := testserver.Start(t, testserver.Options{Size: 40 << 20, Config: server.Config{ReadOnly: tc.readOnly}})
			out := testserver.Run(t, toolTimeout, testserver.Tool(t, "nbdinfo"), "--json", inst.URI())
			var info struct {
				Protocol   string          `json:"protocol"`
				Structured bool            `json:"structured"`
				Exports    []nbdinfoExport `json:"exports"`
			}
			require.NoError(t, json.Unmarshal([]byte(out), &info), out)
			assert.Equal(t, "newstyle-fixed", info.Protocol)
			assert.True(t, info.Structured, "structured replies negotiated")
			require.Len(t, info.Exports, 1)
			e := info.Exports[0]
			assert.Equal(t, int64(40<<20), e.Size)
			assert.Equal(t, tc.readOnly, e.ReadOnly)
			assert.Contains(t, e.Contexts, "base:allocation")
			assert.True(t, e.CanFlush, "can_flush")
			assert.True(t, e.CanFUA, "can_fua")
			assert.True(t, e.CanCache, "can_cache")
			assert.True(t, e.CanDF, "can_df")
			assert.True(t, e.CanMultiConn, "can_multi_conn")
			// A read-only export offers none of the writing commands.
			assert.Equal(t, !tc.readOnly, e.CanTrim, "can_trim")
			assert.Equal(t, !tc.readOnly, e.CanZero, "can_zero")
			assert.Equal(t, !tc.readOnly, e.CanFastZero, "can_fast_zero")
			assert.Equal(t, int64(1), e.MinBlock)
			assert.Equal(t, int64(4096), e.PrefBlock)
			assert.Equal(t, int64(32<<20), e.MaxBlock)
		})
	}
}

// nbdinfoMap returns the data runs `nbdinfo --map` reports, merged where
// they touch, and checks that the map covers the export without gaps.
func nbdinfoMap(t testing.TB, uri string, size int64) []span {
	t.Helper()
	out := testserver.Run(t, toolTimeout, testserver.Tool(t, "nbdinfo"), "--map", uri)
	var data []span
	var end int64
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		// offset length type description, e.g. "0  4096  3  hole,zero"
		f := strings.Fields(line)
		require.GreaterOrEqual(t, len(f), 3, "map line %q", line)
		off, err1 := strconv.ParseInt(f[0], 10, 64)
		n, err2 := strconv.ParseInt(f[1], 10, 64)
		typ, err3 := strconv.Atoi(f[2])
		require.NoError(t, err1)
		require.NoError(t, err2)
		require.NoError(t, err3)
		require.Equal(t, end, off, "map lines are contiguous: %q", line)
		end = off + n
		switch typ {
		case 0:
			if k := len(data); k > 0 && data[k-1].off+data[k-1].len == off {
				data[k-1].len += n
			} else {
				data = append(data, span{off, n})
			}
		case 3: // hole and zero, as the server always reports them together
		default:
			t.Fatalf("unexpected extent type in %q", line)
		}
	}
	require.Equal(t, size, end, "the map covers the export")
	return data
}

// TestNbdinfoMap checks base:allocation as libnbd sees it: the data and
// holes of a file with a known layout, including data at both ends.
func TestNbdinfoMap(t *testing.T) {
	tests := []struct {
		name   string
		size   int64
		layout []span
	}{
		{"all hole", 8 << 20, nil},
		{"data at both ends", 8 << 20, []span{{0, 4096}, {8<<20 - 64<<10, 64 << 10}}},
		{"scattered", 24 << 20, []span{{1 << 20, 4096}, {3 << 20, 1 << 20}, {10 << 20, 8192}, {20 << 20, 2 << 20}}},
		{"all data", 4 << 20, []span{{0, 4 << 20}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			path, _ := sparseImage(t, tc.size, tc.layout)
			inst := testserver.Start(t, testserver.Options{Path: path})
			assert.Equal(t, tc.layout, nbdinfoMap(t, inst.URI(), tc.size))
		})
	}
}

// TestNbdcopy copies whole images in and out with libnbd's copier, which
// keeps many requests in flight on several connections and, for sparse
// sources, sends zeroing requests instead of data.
func TestNbdcopy(t *testing.T) {
	nbdcopy := testserver.Tool(t, "nbdcopy")

	t.Run("random 64 MiB round trip", func(t *testing.T) {
		const size = 64 << 20
		src := randomBytes(t, size)
		srcPath := writeTemp(t, "src.img", src)
		inst := testserver.Start(t, testserver.Options{Size: size})
		testserver.Run(t, toolTimeout, nbdcopy, srcPath, inst.URI())
		requireSame(t, src, readRange(t, inst.Path, 0, size), "export file after copy in")

		out := filepath.Join(t.TempDir(), "out.img")
		testserver.Run(t, toolTimeout, nbdcopy, inst.URI(), out)
		got, err := os.ReadFile(out)
		require.NoError(t, err)
		requireSame(t, src, got, "copy out")
	})

	t.Run("sparse image stays sparse", func(t *testing.T) {
		const size = 64 << 20
		layout := []span{{0, 64 << 10}, {5 << 20, 1 << 20}, {30<<20 + 4096, 256 << 10}, {size - 8192, 8192}}
		var dataBytes int64
		for _, s := range layout {
			dataBytes += s.len
		}
		srcPath, src := sparseImage(t, size, layout)
		inst := testserver.Start(t, testserver.Options{Size: size})
		testserver.Run(t, toolTimeout, nbdcopy, srcPath, inst.URI())

		requireSame(t, src, readRange(t, inst.Path, 0, size), "export file after copy in")
		// Holes stay holes: the export holds little more than the data
		// (a file system block of slack per run at most).
		assert.LessOrEqual(t, allocated(t, inst.Path), dataBytes+int64(len(layout))*64<<10,
			"allocated bytes of the export for %d bytes of data", dataBytes)
		assert.Equal(t, layout, nbdinfoMap(t, inst.URI(), size))

		out := filepath.Join(t.TempDir(), "out.img")
		testserver.Run(t, toolTimeout, nbdcopy, inst.URI(), out)
		got, err := os.ReadFile(out)
		require.NoError(t, err)
		requireSame(t, src, got, "copy out")
	})
}
