package mirror_test

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/sparse"
)

// Mixed fleets: our flexnbd migrating into the C flexnbd's listen, and the
// C flexnbd's mirror migrating into ours, against the stand-ins in
// cflexnbd_helpers_test.go.

// mixedSize is not a multiple of the copy chunk, of the C mirror's 8 MiB
// or of 4 KiB: every side meets a short last request.
const mixedSize = 24<<20 + 3*4096 + 512

// mixedFile makes a sparse source of mixedSize bytes: a run of data at
// the start, a lone block in the middle of a hole, a run that starts and
// ends off every boundary, one straddling the C mirror's 8 MiB chunks,
// and the very last bytes; everything else is hole, the C mirror's second
// chunk entirely.
func mixedFile(t testing.TB) string {
	return makeFile(t, mixedSize, map[int64][]byte{
		0:                random(1, 1<<20),
		5 << 20:          random(2, 4096),
		17<<20 + 100:     random(3, 3<<20),
		24<<20 - 4096:    random(4, 8192),
		mixedSize - 17:   random(5, 17),
		mixedSize - 4096: random(6, 8),
	})
}

// requireSparseCopy checks that dst allocated no more than src did: the
// zeroes of the holes, though sent as data, were not written.
func requireSparseCopy(t testing.TB, src, dst string) {
	t.Helper()
	srcAlloc, dstAlloc := allocated(t, src), allocated(t, dst)
	require.Less(t, srcAlloc, int64(mixedSize/4), "the source must be sparse for this test")
	assert.LessOrEqual(t, dstAlloc, srcAlloc+64<<10,
		"the copy allocated %d bytes for %d of data: zero blocks were written", dstAlloc, srcAlloc)
}

// Only what the C listen offers may reach it: WRITE, FLUSH and the final
// DISC; never WRITE_ZEROES, TRIM or BLOCK_STATUS, which it would refuse.
func requireOnlyCCommands(t testing.TB, got map[uint16]int) {
	t.Helper()
	for typ, n := range got {
		switch typ {
		case cmdWrite, cmdFlush, cmdDisc:
		default:
			t.Errorf("the C listen received %d requests of type %d", n, typ)
		}
	}
	assert.Positive(t, got[cmdWrite], "WRITEs")
	assert.Positive(t, got[cmdFlush], "FLUSHes")
	assert.Equal(t, 1, got[cmdDisc], "DISCs")
}

// The stand-in answers as the C listen does, so that the tests below
// hold our source to the real thing.
func TestCListenStandInAnswersAsDocumented(t *testing.T) {
	const size = 1<<20 + 512
	s := startCListen(t, makeFile(t, size, nil), 0)
	nc, err := net.Dial("tcp", s.addr())
	require.NoError(t, err)
	defer nc.Close()
	require.NoError(t, nc.SetDeadline(time.Now().Add(testTimeout)))

	g := make([]byte, cGreetingSize)
	_, err = io.ReadFull(nc, g)
	require.NoError(t, err)
	assert.Equal(t, "NBDMAGIC", string(g[:8]))
	assert.Equal(t, uint64(0x0000420281861253), binary.BigEndian.Uint64(g[8:16]))
	assert.Equal(t, uint64(size), binary.BigEndian.Uint64(g[16:24]))
	assert.Equal(t, uint32(0x0D), binary.BigEndian.Uint32(g[24:28]), "HAS_FLAGS|SEND_FLUSH|SEND_FUA")
	assert.True(t, sparse.IsZero(g[28:]))

	ask := func(req, payload []byte, wantErrno uint32) {
		t.Helper()
		_, err := nc.Write(append(req, payload...))
		require.NoError(t, err)
		errno, handle, err := cReadReply(nc)
		require.NoError(t, err)
		assert.Equal(t, wantErrno, errno)
		assert.Equal(t, binary.BigEndian.Uint64(req[8:16]), handle)
	}
	ask(cRequest(cmdWriteZeroes, 0, 1, 0, 4096), nil, errEINVAL)
	ask(cRequest(cmdTrim, 0, 2, 0, 4096), nil, errEINVAL)
	ask(cRequest(cmdBlockStatus, 0, 3, 0, 4096), nil, errEINVAL)
	ask(cRequest(cmdRead, 0, 4, size-512, 1024), nil, errENOSPC)
	ask(cRequest(cmdWrite, 0, 5, size, 512), make([]byte, 512), errENOSPC) // payload drained
	data := random(7, 4096)
	ask(cRequest(cmdWrite, cFlagFUA, 6, 8192, 4096), data, 0)
	ask(cRequest(cmdRead, 0, 7, 8192, 4096), nil, 0)
	got := make([]byte, 4096)
	_, err = io.ReadFull(nc, got)
	require.NoError(t, err)
	assert.Equal(t, data, got)
	ask(cRequest(cmdFlush, 0, 8, 0, 0), nil, 0)

	bad := cRequest(cmdWrite, 0, 0x0102030405060708, 0, 0)
	binary.BigEndian.PutUint32(bad, 0xdeadbeef)
	_, err = nc.Write(bad)
	require.NoError(t, err)
	rest := readUntilClosed(t, nc)
	require.Len(t, rest, cReplySize, "one reply, then the connection closes")
	assert.Equal(t, uint32(cMagicReply), binary.BigEndian.Uint32(rest[:4]))
	assert.Equal(t, uint32(errEBADMSG), binary.BigEndian.Uint32(rest[4:8]))
	assert.Equal(t, uint64(0x0102030405060708), binary.BigEndian.Uint64(rest[8:]))
	select {
	case <-s.done:
		t.Fatal("a bad magic is no DISC")
	default:
	}
}

// Our source migrates into the C flexnbd's listen, which offers neither
// WRITE_ZEROES nor BLOCK_STATUS: holes go as zero data, which the C
// receiver does not write, and the migration ends with FLUSH and DISC.
func TestGoSourceIntoCListen(t *testing.T) {
	for _, tt := range []struct {
		name   string
		finish mirror.Finish
	}{{"finish nothing", mirror.FinishNothing}, {"finish exit", mirror.FinishExit}} {
		t.Run(tt.name, func(t *testing.T) {
			path := mixedFile(t)
			_, exp := source(t, path)
			dstPath := makeFile(t, mixedSize, nil)
			c := startCListen(t, dstPath, 0)

			cfg := config(t, exp, c.addr())
			cfg.Finish = tt.finish
			m := startMirror(t, cfg)
			require.NoError(t, waitDone(t, m))
			c.waitDISC(t)

			requireOnlyCCommands(t, c.commands())
			requireSameFiles(t, path, dstPath)
			requireSparseCopy(t, path, dstPath)
			st := m.Status()
			assert.True(t, st.Done)
			assert.Equal(t, 1, st.Attempts)
			assert.Equal(t, 1, c.connections())
		})
	}
}

// The C listen's connection breaks mid-copy: our source reconnects after
// its backoff, starts over and completes.
func TestGoSourceIntoCListenRetriesAfterDrop(t *testing.T) {
	path := mixedFile(t)
	_, exp := source(t, path)
	dstPath := makeFile(t, mixedSize, nil)
	c := startCListen(t, dstPath, 5)

	m := startMirror(t, config(t, exp, c.addr()))
	require.NoError(t, waitDone(t, m))
	c.waitDISC(t)

	assert.Equal(t, 2, c.connections())
	assert.Equal(t, 2, m.Status().Attempts)
	requireOnlyCCommands(t, c.commands())
	requireSameFiles(t, path, dstPath)
	requireSparseCopy(t, path, dstPath)
}

// Clients keep writing to our source while it migrates into the C
// listen: every acknowledged write is there after the hand-off, whether
// the copy or active mirroring carried it, still without a request the C
// listen does not know.
func TestGoSourceIntoCListenUnderWrites(t *testing.T) {
	path := mixedFile(t)
	src, exp := source(t, path)
	dstPath := makeFile(t, mixedSize, nil)
	c := startCListen(t, dstPath, 0)

	ctx := testCtx(t)
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	s := &testserver.Stamper{Blocks: 256}
	writers := make(chan struct{})
	go func() { s.Run(wctx, t, src.Addr, 4, 0); close(writers) }()

	cfg := config(t, exp, c.addr())
	cfg.Finish = mirror.FinishExit
	m := startMirror(t, cfg)
	require.NoError(t, waitDone(t, m))
	c.waitDISC(t)
	select {
	case <-writers:
	case <-time.After(testTimeout):
		t.Fatal("writers not stopped by the hand-off")
	}
	require.Positive(t, s.Writes())
	s.Verify(t, dstPath)
	requireOnlyCCommands(t, c.commands())
	require.NoError(t, src.Server.Close())
	requireSameFiles(t, path, dstPath)
}

// The C flexnbd's mirror migrates into our listen: 8 MiB WRITEs of the
// whole file, holes as data, then DISC without FLUSH. The destination
// completes, holds the same bytes, and did not allocate the zero blocks.
func TestCMirrorIntoGoListen(t *testing.T) {
	path := mixedFile(t)
	dst, d, ended := goListen(t, mixedSize, true)

	require.NoError(t, cMirror(testCtx(t), dst.Addr, path, 0))
	waitComplete(t, d)
	e := nextEnd(t, ended)
	assert.True(t, e.Disconnected)
	assert.False(t, e.FlushedLast)
	assert.Equal(t, uint64((mixedSize+cMirrorChunk-1)/cMirrorChunk), e.Requests)
	assert.True(t, d.HasControl())
	requireSameFiles(t, path, dst.Path)
	requireSparseCopy(t, path, dst.Path)
}

// A C mirror that goes away mid-copy without DISC leaves our listen
// waiting: partial data is not a completed migration. Its next run, from
// the beginning as the C mirror retries, completes it.
func TestCMirrorInterruptedThenRetriedIntoGoListen(t *testing.T) {
	path := mixedFile(t)
	dst, d, ended := goListen(t, mixedSize, true)
	ctx := testCtx(t)

	require.ErrorIs(t, cMirror(ctx, dst.Addr, path, 2), errCMirrorStopped)
	e := nextEnd(t, ended)
	assert.False(t, e.Disconnected)
	assert.Equal(t, uint64(2), e.Requests)
	assert.False(t, d.HasControl())
	select {
	case <-d.Complete():
		t.Fatal("destination completed without DISC")
	default:
	}

	require.NoError(t, cMirror(ctx, dst.Addr, path, 0))
	waitComplete(t, d)
	assert.True(t, nextEnd(t, ended).Disconnected)
	requireSameFiles(t, path, dst.Path)
}

// Connections that break the protocol at our listen are closed and do
// not complete the migration, in oldstyle (facing C sources) and in
// newstyle (facing ours); a good source afterwards completes it. Only the
// oldstyle server answers a bad magic, with the C flexnbd's EBADMSG.
func TestHostileSourcesAtGoListen(t *testing.T) {
	const size = 16<<20 + 512
	for _, style := range []struct {
		name     string
		oldstyle bool
	}{{"oldstyle", true}, {"newstyle", false}} {
		t.Run(style.name, func(t *testing.T) {
			dst, d, ended := goListen(t, size, style.oldstyle)
			dial := func(t *testing.T) net.Conn {
				if style.oldstyle {
					return dialOldstyle(t, dst.Addr)
				}
				return dialNewstyle(t, dst.Addr, mirror.SourceExportName)
			}
			// incomplete checks that the hostile session ended and
			// left the destination waiting for a real source.
			incomplete := func(t *testing.T) {
				t.Helper()
				e := nextEnd(t, ended)
				assert.False(t, e.Disconnected)
				assert.False(t, d.HasControl())
			}

			t.Run("bad magic", func(t *testing.T) {
				nc := dial(t)
				bad := cRequest(cmdWrite, 0, 0x1122334455667788, 0, 0)
				binary.BigEndian.PutUint32(bad, 0x25609514)
				_, err := nc.Write(bad)
				require.NoError(t, err)
				got := readUntilClosed(t, nc)
				if !style.oldstyle {
					assert.Empty(t, got, "newstyle: closed without a reply")
				} else {
					require.Len(t, got, cReplySize, "oldstyle: one reply, then closed")
					assert.Equal(t, uint32(cMagicReply), binary.BigEndian.Uint32(got[:4]))
					assert.Equal(t, uint32(nbd.EBADMSG), binary.BigEndian.Uint32(got[4:8]))
					assert.Equal(t, uint64(0x1122334455667788), binary.BigEndian.Uint64(got[8:]))
				}
				incomplete(t)
			})
			t.Run("garbage", func(t *testing.T) {
				nc := dial(t)
				junk := random(11, 4096)
				require.NotEqual(t, uint32(cMagicRequest), binary.BigEndian.Uint32(junk))
				_, err := nc.Write(junk)
				require.NoError(t, err)
				got := readUntilClosed(t, nc)
				if style.oldstyle && len(got) > 0 {
					// The first 28 bytes read as a header with a bad
					// magic; the reply may be lost to a reset if the
					// server closed with junk unread.
					require.Len(t, got, cReplySize)
					assert.Equal(t, uint32(nbd.EBADMSG), binary.BigEndian.Uint32(got[4:8]))
				} else {
					assert.Empty(t, got)
				}
				incomplete(t)
			})
			t.Run("write cut short", func(t *testing.T) {
				nc := dial(t)
				_, err := nc.Write(append(cRequest(cmdWrite, 0, 1, 1<<20, 1<<20), random(12, 1000)...))
				require.NoError(t, err)
				require.NoError(t, nc.(*net.TCPConn).CloseWrite())
				assert.Empty(t, readUntilClosed(t, nc), "no reply to a write that never arrived whole")
				incomplete(t)
				f, err := os.Open(dst.Path)
				require.NoError(t, err)
				defer f.Close()
				p := make([]byte, 1<<20)
				_, err = f.ReadAt(p, 1<<20)
				require.NoError(t, err)
				assert.True(t, sparse.IsZero(p), "nothing of the partial write was written")
			})

			path := makeFile(t, size, map[int64][]byte{0: random(13, 64<<10), 9 << 20: random(14, 4096)})
			if style.oldstyle {
				require.NoError(t, cMirror(testCtx(t), dst.Addr, path, 0))
			} else {
				_, exp := source(t, path)
				require.NoError(t, waitDone(t, startMirror(t, config(t, exp, dst.Addr))))
			}
			waitComplete(t, d)
			requireSameFiles(t, path, dst.Path)
		})
	}
}
