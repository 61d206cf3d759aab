package server_test

import (
	"bytes"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// Data written at any byte offset and length reads back exactly, and the
// bytes around it are untouched.
func TestUnalignedWriteReadRoundTrip(t *testing.T) {
	tests := []struct {
		name   string
		off    uint64
		length int
	}{
		{"one byte", 1, 1},
		{"across a page boundary", 4095, 2},
		{"odd sector offset", 513, 7000},
		{"inline limit exactly", 3, 128 << 10},
		{"past the inline limit", 12345, 200001},
		{"over a mebibyte", 777, 1<<20 + 13},
	}
	const margin = 100
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			inst := m.start(t, testserver.Options{})
			c := m.dial(t, inst)
			for i, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					ctx := testCtx(t)
					off := uint64(i)*(4<<20) + 4096 + tt.off
					want := pattern(uint64(i), tt.length)
					require.NoError(t, c.Write(ctx, want, off, 0))
					got := make([]byte, tt.length+2*margin)
					require.NoError(t, c.Read(ctx, got, off-margin, 0))
					assert.Equal(t, make([]byte, margin), got[:margin], "bytes before the write changed")
					assert.True(t, bytes.Equal(want, got[margin:margin+tt.length]), "written bytes differ")
					assert.Equal(t, make([]byte, margin), got[margin+tt.length:], "bytes after the write changed")
				})
			}
		})
	}
}

// A transfer larger than the 32 MiB maximum block size goes through the
// client in pieces, in every mode, and a piece past the end fails with the
// errno that piece got while the connection stays usable.
func TestTransfersOverTheMaximumBlockSize(t *testing.T) {
	const size = 80 << 20
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			inst := m.start(t, testserver.Options{Size: size})
			c := m.dial(t, inst)
			ctx := testCtx(t)
			const off, n = 4097, 40<<20 + 123
			want := pattern(7, n)
			require.NoError(t, c.Write(ctx, want, off, nbd.CmdFlagFUA))
			got := make([]byte, n)
			require.NoError(t, c.Read(ctx, got, off, 0))
			assert.True(t, bytes.Equal(want, got), "a split transfer read back different bytes")

			past := make([]byte, 40<<20)
			err := c.Read(ctx, past, size-(8<<20), 0)
			wantErr := nbd.EINVAL
			if m.oldstyle {
				wantErr = nbd.ENOSPC
			}
			assert.ErrorIs(t, err, wantErr)
			roundTrip(t, c, 0, 3)
		})
	}
}

// FUA makes the server ask the backend for durability before answering,
// FLUSH syncs, and neither happens for plain requests.
func TestDurabilityRequestsReachTheBackend(t *testing.T) {
	tests := []struct {
		name     string
		do       func(*testing.T, *nbd.Client) error
		fuaWrite int // WriteAt calls with fua set
		syncs    int
	}{
		{"plain write", func(t *testing.T, c *nbd.Client) error {
			return c.Write(testCtx(t), pattern(1, 4096), 0, 0)
		}, 0, 0},
		{"fua write", func(t *testing.T, c *nbd.Client) error {
			return c.Write(testCtx(t), pattern(2, 4096), 0, nbd.CmdFlagFUA)
		}, 1, 0},
		{"large fua write", func(t *testing.T, c *nbd.Client) error {
			return c.Write(testCtx(t), pattern(3, 1<<20), 0, nbd.CmdFlagFUA)
		}, 1, 0},
		{"flush", func(t *testing.T, c *nbd.Client) error { return c.Flush(testCtx(t)) }, 0, 1},
		{"trim", func(t *testing.T, c *nbd.Client) error { return c.Trim(testCtx(t), 0, 4096, 0) }, 0, 0},
		{"fua trim", func(t *testing.T, c *nbd.Client) error {
			return c.Trim(testCtx(t), 0, 4096, nbd.CmdFlagFUA)
		}, 0, 1},
		{"fua write zeroes", func(t *testing.T, c *nbd.Client) error {
			return c.WriteZeroes(testCtx(t), 0, 4096, nbd.CmdFlagFUA)
		}, 0, 1},
	}
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					var mu sync.Mutex
					var fuaWrites, syncs int
					be := wrapFile(t)
					be.write = func(p []byte, off uint64, fua bool) error {
						mu.Lock()
						if fua {
							fuaWrites++
						}
						mu.Unlock()
						return be.Backend.WriteAt(p, off, fua)
					}
					be.sync = func() error {
						mu.Lock()
						syncs++
						mu.Unlock()
						return be.Backend.Sync()
					}
					inst := m.start(t, testserver.Options{Config: server.Config{Backend: be}})
					c := m.dial(t, inst)
					require.NoError(t, tt.do(t, c))
					mu.Lock()
					defer mu.Unlock()
					assert.Equal(t, tt.fuaWrite, fuaWrites, "writes asked to be durable")
					assert.Equal(t, tt.syncs, syncs, "syncs")
				})
			}
		})
	}
}

// TRIM of any range makes it read as zeroes (the file backend punches a
// hole) and leaves the bytes around it alone.
func TestTrimReadsZeroes(t *testing.T) {
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			inst := m.start(t, testserver.Options{})
			c := m.dial(t, inst)
			ctx := testCtx(t)
			data := pattern(9, 256<<10)
			require.NoError(t, c.Write(ctx, data, 0, 0))
			const lo, hi = 1000, 200000 // deliberately unaligned
			require.NoError(t, c.Trim(ctx, lo, hi-lo, 0))
			got := make([]byte, len(data))
			require.NoError(t, c.Read(ctx, got, 0, 0))
			want := bytes.Clone(data)
			clear(want[lo:hi])
			require.True(t, bytes.Equal(want, got), "trimmed range must read as zeroes, the rest unchanged")
		})
	}
}

// WRITE_ZEROES always reads back as zeroes; without NO_HOLE it gives the
// space back, with NO_HOLE it keeps it allocated (the point of NO_HOLE:
// later writes there must not fail for lack of space).
func TestWriteZeroesAllocation(t *testing.T) {
	const off, length = 1 << 20, 1 << 20 // block aligned, so whole blocks are freed
	tests := []struct {
		name      string
		flags     nbd.CmdFlags
		wantHole  bool
		mayRefuse bool // FAST_ZERO may answer ENOTSUP when zeroing is slow
	}{
		{"punches a hole", 0, true, false},
		{"no hole keeps allocation", nbd.CmdFlagNoHole, false, false},
		{"fast zero", nbd.CmdFlagFastZero, true, false},
		{"fast zero with no hole", nbd.CmdFlagFastZero | nbd.CmdFlagNoHole, false, true},
		{"fua", nbd.CmdFlagFUA, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := newSparseFile(t, exportSize)
			inst := testserver.Start(t, testserver.Options{Path: path})
			c := inst.Dial(t, nil)
			ctx := testCtx(t)
			data := pattern(5, 3<<20)
			require.NoError(t, c.Write(ctx, data, 0, 0))
			require.NoError(t, c.Flush(ctx))
			before := allocatedBytes(t, path)
			require.GreaterOrEqual(t, before, int64(len(data)))

			err := c.WriteZeroes(ctx, off, length, tt.flags)
			if tt.mayRefuse && err != nil {
				require.ErrorIs(t, err, nbd.ENOTSUP)
				roundTrip(t, c, 8<<20, 1)
				return
			}
			require.NoError(t, err)
			require.NoError(t, c.Flush(ctx))

			got := make([]byte, len(data))
			require.NoError(t, c.Read(ctx, got, 0, 0))
			want := bytes.Clone(data)
			clear(want[off : off+length])
			require.True(t, bytes.Equal(want, got), "zeroed range must read as zeroes, the rest unchanged")

			after := allocatedBytes(t, path)
			if tt.wantHole {
				assert.Equal(t, before-length, after, "the zeroed range must be deallocated")
				assert.True(t, isHole(t, path, off, length), "the zeroed range must be a hole")
			} else {
				assert.Equal(t, before, after, "NO_HOLE must keep the range allocated")
			}
		})
	}
}

// A write of all zeroes into a hole is the common case when copying a
// sparse image: it must not allocate anything, while zeroes written over
// data must still replace that data.
func TestZeroWritesKeepHolesSparse(t *testing.T) {
	path := newSparseFile(t, exportSize)
	inst := testserver.Start(t, testserver.Options{Path: path})
	for _, m := range []mode{structuredMode, simpleMode} {
		t.Run(m.name, func(t *testing.T) {
			c := m.dial(t, inst)
			ctx := testCtx(t)
			base := uint64(8 << 20)
			if m.simple {
				base = 16 << 20
			}
			data := pattern(11, 64<<10)
			require.NoError(t, c.Write(ctx, data, base, 0))
			require.NoError(t, c.Flush(ctx))
			before := allocatedBytes(t, path)

			zeroes := make([]byte, 1<<20)
			require.NoError(t, c.Write(ctx, zeroes, base+(2<<20), 0), "zeroes into a hole")
			require.NoError(t, c.Write(ctx, zeroes[:5000], base+1000, 0), "zeroes over data")
			require.NoError(t, c.Flush(ctx))
			assert.Equal(t, before, allocatedBytes(t, path), "zero writes must not allocate")

			got := make([]byte, len(data))
			require.NoError(t, c.Read(ctx, got, base, 0))
			want := bytes.Clone(data)
			clear(want[1000:6000])
			require.True(t, bytes.Equal(want, got), "zeroes written over data must replace it")
		})
	}
}

// A write of data with blocks of zeroes in it is how the C flexnbd's
// mirror sends a sparse image: the whole file, holes included, 8 MiB at a
// time. Where such a write lands in a hole only its data blocks may be
// allocated; where it lands on data its zeroes must replace that data.
func TestZeroBlocksInsideDataWritesKeepHolesSparse(t *testing.T) {
	path := newSparseFile(t, exportSize)
	inst := testserver.Start(t, testserver.Options{Path: path})
	c := inst.Dial(t, nil)
	ctx := testCtx(t)
	const base = 8 << 20
	require.NoError(t, c.Write(ctx, pattern(21, 64<<10), base+(1<<20), 0), "data the write will cover")
	require.NoError(t, c.Flush(ctx))
	before := allocatedBytes(t, path)

	// 2 MiB: a block of data at the start, one off every boundary in
	// the middle (two blocks), zeroes over the 64 KiB of data at 1 MiB,
	// and a tail of data one byte long; zeroes everywhere else.
	p := make([]byte, 2<<20)
	copy(p, pattern(22, 4096))
	copy(p[512<<10+100:], pattern(23, 5000))
	p[len(p)-1] = 0xff
	require.NoError(t, c.Write(ctx, p, base, 0))
	require.NoError(t, c.Flush(ctx))
	grown := allocatedBytes(t, path) - before
	assert.LessOrEqual(t, grown, int64(4*4096), "only the 4 blocks holding data may be allocated, not %d bytes", grown)

	got := make([]byte, len(p))
	require.NoError(t, c.Read(ctx, got, base, 0))
	require.True(t, bytes.Equal(p, got), "the write must read back whole, zeroes over data included")
}

// layoutFile makes a sparse file whose first 256 KiB are: data, hole,
// data, hole (64 KiB, 128 KiB, 64 KiB, then hole to the end).
func layoutFile(t *testing.T) (path string, contents []byte) {
	t.Helper()
	path = newSparseFile(t, exportSize)
	contents = make([]byte, 1<<20)
	copy(contents[0:64<<10], pattern(21, 64<<10))
	copy(contents[192<<10:256<<10], pattern(22, 64<<10))
	require.NoError(t, writeFileAt(path, contents[0:64<<10], 0))
	require.NoError(t, writeFileAt(path, contents[192<<10:256<<10], 192<<10))
	require.True(t, isHole(t, path, 64<<10, 128<<10), "the file system must support holes for this test")
	return path, contents
}

const holeZero = nbd.StateHole | nbd.StateZero

func ext(length, flags uint32) nbd.Extent { return nbd.Extent{Length: length, Flags: flags} }

func TestBlockStatusDescribesLayout(t *testing.T) {
	path, _ := layoutFile(t)
	inst := testserver.Start(t, testserver.Options{Path: path})
	c := inst.Dial(t, nil)
	const K = 1024
	tests := []struct {
		name   string
		off    uint64
		length uint32
		flags  nbd.CmdFlags
		want   []nbd.Extent
	}{
		{"whole layout", 0, 1 << 20, 0,
			[]nbd.Extent{ext(64*K, 0), ext(128*K, holeZero), ext(64*K, 0), ext(768*K, holeZero)}},
		{"unaligned start", 1000, 100 * K, 0,
			[]nbd.Extent{ext(64*K-1000, 0), ext(36*K+1000, holeZero)}},
		{"inside one hole", 70 * K, 8 * K, 0, []nbd.Extent{ext(8*K, holeZero)}},
		{"end of export", exportSize - 4*K, 4 * K, 0, []nbd.Extent{ext(4*K, holeZero)}},
		{"req one from data", 0, 1 << 20, nbd.CmdFlagReqOne, []nbd.Extent{ext(64*K, 0)}},
		{"req one from hole", 100 * K, 1 << 20, nbd.CmdFlagReqOne, []nbd.Extent{ext(92*K, holeZero)}},
		{"req one shorter than the extent", 16 * K, 8 * K, nbd.CmdFlagReqOne, []nbd.Extent{ext(8*K, 0)}},
		{"req one of a single byte", 64 * K, 1, nbd.CmdFlagReqOne, []nbd.Extent{ext(1, holeZero)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := c.BlockStatus(testCtx(t), tt.off, tt.length, tt.flags)
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
			if tt.flags&nbd.CmdFlagReqOne != 0 {
				require.Len(t, got, 1, "REQ_ONE asks for exactly one extent")
				assert.LessOrEqual(t, got[0].Length, tt.length, "REQ_ONE extent longer than the request")
			}
		})
	}
}

// A structured READ describes holes as hole chunks rather than sending
// zeroes, and DF asks for the whole range in one data chunk; either way
// the client ends up with the right bytes.
func TestStructuredReadChunks(t *testing.T) {
	path, contents := layoutFile(t)
	inst := testserver.Start(t, testserver.Options{Path: path})
	c, tap := dialTap(t, inst.Addr)
	const K = 1024
	data, hole, done := nbd.ReplyTypeOffsetData, nbd.ReplyTypeOffsetHole, nbd.ReplyFlagDone
	tests := []struct {
		name   string
		off    uint64
		length int
		flags  nbd.CmdFlags
		want   []chunk
	}{
		{"data and holes", 32 * K, 256 * K, 0, []chunk{
			{0, data, 32 * K, 32 * K}, {0, hole, 64 * K, 128 * K},
			{0, data, 192 * K, 64 * K}, {done, hole, 256 * K, 32 * K}}},
		{"only hole", 300 * K, 64 * K, 0, []chunk{{done, hole, 300 * K, 64 * K}}},
		{"only data", 200 * K, 10, 0, []chunk{{done, data, 200 * K, 10}}},
		{"df over data and holes", 32 * K, 256 * K, nbd.CmdFlagDF, []chunk{{done, data, 32 * K, 256 * K}}},
		{"df over a hole", 300 * K, 64 * K, nbd.CmdFlagDF, []chunk{{done, data, 300 * K, 64 * K}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			allocated := allocatedBytes(t, path)
			got := bytes.Repeat([]byte{0x55}, tt.length) // holes must overwrite this
			tap.record()
			require.NoError(t, c.Read(testCtx(t), got, tt.off, tt.flags))
			assert.Equal(t, tt.want, parseChunks(t, tap.stop()))
			require.True(t, bytes.Equal(contents[tt.off:tt.off+uint64(tt.length)], got), "bytes read differ")
			assert.Equal(t, allocated, allocatedBytes(t, path), "reading must not allocate")
		})
	}

	// A client without structured replies gets the same bytes in one piece.
	simple := inst.Dial(t, &nbd.ClientOptions{NoStructuredReplies: true})
	got := make([]byte, 256*K)
	require.NoError(t, simple.Read(testCtx(t), got, 32*K, 0))
	require.True(t, bytes.Equal(contents[32*K:288*K], got))
}
