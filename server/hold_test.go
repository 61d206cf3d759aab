package server_test

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// heldServer serves a file whose writes at [1 MiB, 2 MiB) stall until
// released, and counts the writes that reach the backend.
func heldServer(t *testing.T, m mode) (*testserver.Instance, *stall, *atomic.Int64, server.Backend) {
	be := wrapFile(t)
	st := newStall(t, 1<<20, 2<<20)
	var writes atomic.Int64
	be.write = func(p []byte, off uint64, fua bool) error {
		writes.Add(1)
		if st.covers(off, len(p)) {
			st.hold()
		}
		return be.Backend.WriteAt(p, off, fua)
	}
	inst := m.start(t, testserver.Options{Config: server.Config{Backend: be}})
	st.releaseBeforeShutdown(t)
	return inst, st, &writes, be.Backend
}

// Hold waits for the requests already running, holds every new one
// without an error, and Resume runs the held ones.
func TestHoldWaitsForRunningRequestsAndHoldsNewOnes(t *testing.T) {
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			inst, st, writes, _ := heldServer(t, m)
			running := m.dial(t, inst)
			later := m.dial(t, inst)
			ctx := testCtx(t)

			runErr := make(chan error, 1)
			go func() { runErr <- running.Write(ctx, pattern(1, 4096), 1<<20, 0) }()
			st.awaitEntered(t, 1)

			held := make(chan error, 1)
			go func() { held <- inst.Server.Hold(ctx) }()
			waitFor(t, "the hold", inst.Server.Held)
			select {
			case err := <-held:
				t.Fatalf("Hold returned (%v) while a write was still running", err)
			case <-time.After(50 * time.Millisecond):
			}

			before := writes.Load()
			laterErr := make(chan error, 1)
			go func() { laterErr <- later.Write(ctx, pattern(2, 4096), 8<<20, 0) }()
			waitFor(t, "the later write to be held", func() bool { return inst.Server.HeldRequests() == 1 })

			st.Release()
			require.NoError(t, <-runErr, "the running write finishes normally")
			require.NoError(t, <-held)
			assert.Equal(t, before, writes.Load(), "a held write must not reach the backend")
			select {
			case err := <-laterErr:
				t.Fatalf("held write answered during the hold: %v", err)
			case <-time.After(50 * time.Millisecond):
			}

			inst.Server.Resume()
			require.NoError(t, <-laterErr, "a resumed write completes without an error")
			got := make([]byte, 4096)
			require.NoError(t, later.Read(ctx, got, 8<<20, 0))
			assert.Equal(t, pattern(2, 4096), got)
			assert.False(t, inst.Server.Held())
		})
	}
}

// DropHeld closes the held requests' connections without running them:
// their clients replay them elsewhere.
func TestDropHeldNeverRunsHeldRequests(t *testing.T) {
	inst, _, writes, file := heldServer(t, structuredMode)
	c := inst.Dial(t, nil)
	ctx := testCtx(t)
	require.NoError(t, c.Write(ctx, pattern(1, 4096), 0, 0))

	require.NoError(t, inst.Server.Hold(ctx))
	before := writes.Load()
	heldErr := make(chan error, 1)
	go func() { heldErr <- c.Write(ctx, pattern(2, 4096), 0, 0) }()
	waitFor(t, "the write to be held", func() bool { return inst.Server.HeldRequests() == 1 })

	inst.Server.DropHeld()
	err := <-heldErr
	require.Error(t, err, "a dropped request gets no reply")
	var errno nbd.Errno
	assert.False(t, errors.As(err, &errno), "the connection closes rather than answering: %v", err)
	assert.Equal(t, before, writes.Load())

	// A connection made after the drop gets nothing done either.
	late := inst.Dial(t, nil)
	lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	require.Error(t, late.Write(lctx, pattern(3, 4096), 0, 0))
	assert.Equal(t, before, writes.Load())

	data := make([]byte, 4096)
	require.NoError(t, file.ReadAt(data, 0, false))
	assert.Equal(t, pattern(1, 4096), data, "the file keeps what was written before the hold")
}

// A hold whose context ends before the running requests finish is lifted
// again, so a stuck disk cannot freeze every client.
func TestHoldGivesUpWhenItsContextEnds(t *testing.T) {
	inst, st, _, _ := heldServer(t, structuredMode)
	c := inst.Dial(t, nil)
	ctx := testCtx(t)
	stuck := make(chan error, 1)
	go func() { stuck <- c.Write(ctx, pattern(1, 4096), 1<<20, 0) }()
	st.awaitEntered(t, 1)

	hctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	require.ErrorIs(t, inst.Server.Hold(hctx), context.DeadlineExceeded)
	assert.False(t, inst.Server.Held())
	roundTrip(t, inst.Dial(t, nil), 4<<20, 7)
	st.Release()
	require.NoError(t, <-stuck)
}

// A second Hold is refused rather than silently stacked.
func TestHoldTwiceIsRefused(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{})
	ctx := testCtx(t)
	require.NoError(t, inst.Server.Hold(ctx))
	require.ErrorIs(t, inst.Server.Hold(ctx), server.ErrHeld)
	inst.Server.Resume()
	inst.Server.Resume() // a no-op
	roundTrip(t, inst.Dial(t, nil), 0, 1)
}

// Shutdown while a hold is in place drops the held requests instead of
// waiting for a Resume that will not come.
func TestShutdownDuringHoldDropsHeldRequests(t *testing.T) {
	inst, _, writes, _ := heldServer(t, structuredMode)
	c := inst.Dial(t, nil)
	ctx := testCtx(t)
	require.NoError(t, inst.Server.Hold(ctx))
	before := writes.Load()
	heldErr := make(chan error, 1)
	go func() { heldErr <- c.Write(ctx, pattern(2, 4096), 0, 0) }()
	waitFor(t, "the write to be held", func() bool { return inst.Server.HeldRequests() == 1 })
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	require.NoError(t, inst.Server.Shutdown(sctx))
	require.Error(t, <-heldErr)
	assert.Equal(t, before, writes.Load())
}

// A write that fails may have changed part of its range: the hook sees it
// too, so a mirror copies whatever the file now holds.
func TestWriteHookSeesFailedChanges(t *testing.T) {
	be := wrapFile(t)
	be.write = func(p []byte, off uint64, fua bool) error {
		// Half of it lands, then the disk fails.
		if err := be.Backend.WriteAt(p[:len(p)/2], off, false); err != nil {
			return err
		}
		return errors.New("disk failed")
	}
	be.zero = func(off, length uint64, noHole, fastOnly bool) error { return errors.New("disk failed") }
	be.trim = func(off, length uint64) error { return errors.New("disk failed") }
	var mu sync.Mutex
	var seen []span
	hook := func(off, length uint64) {
		mu.Lock()
		seen = append(seen, span{off, length})
		mu.Unlock()
	}
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be, OnWrite: hook}})
	c := inst.Dial(t, nil)
	ctx := testCtx(t)
	require.ErrorIs(t, c.Write(ctx, pattern(1, 8192), 4096, 0), nbd.EIO)
	require.ErrorIs(t, c.WriteZeroes(ctx, 1<<20, 4096, 0), nbd.EIO)
	require.ErrorIs(t, c.Trim(ctx, 2<<20, 4096, 0), nbd.EIO)
	mu.Lock()
	defer mu.Unlock()
	assert.Equal(t, []span{{4096, 8192}, {1 << 20, 4096}, {2 << 20, 4096}}, seen)
}

// On an oldstyle connection a request with a bad magic gets what the C
// flexnbd sends: one simple reply with EBADMSG and the request's handle,
// then the connection closes.
func TestOldstyleBadMagicGetsEBADMSG(t *testing.T) {
	inst := oldstyleMode.start(t, testserver.Options{})
	r := dialRaw(t, inst.Addr)
	hdr := nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdRead, Cookie: 0x1122334455667788, Length: 512})
	hdr[0] ^= 0xff
	_, err := r.nc.Write(hdr)
	require.NoError(t, err)
	require.NoError(t, r.nc.SetReadDeadline(time.Now().Add(10*time.Second)))
	rep, err := r.reply()
	require.NoError(t, err)
	assert.Equal(t, nbd.EBADMSG, rep.Errno)
	assert.Equal(t, uint64(0x1122334455667788), rep.Cookie)
	var rest bytes.Buffer
	_, err = rest.ReadFrom(r.br)
	require.NoError(t, err, "the server closes the connection")
	assert.Zero(t, rest.Len())
}

// Time spent held does not count against the kill switch: a freeze that
// outlasts it drops nobody.
func TestHeldTimeDoesNotCountForTheKillSwitch(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{Config: server.Config{KillSwitch: 100 * time.Millisecond}})
	c := inst.Dial(t, nil)
	ctx := testCtx(t)
	require.NoError(t, inst.Server.Hold(ctx))
	heldErr := make(chan error, 1)
	go func() { heldErr <- c.Write(ctx, pattern(1, 4096), 0, 0) }()
	waitFor(t, "the write to be held", func() bool { return inst.Server.HeldRequests() == 1 })
	time.Sleep(500 * time.Millisecond) // five kill switch periods
	inst.Server.Resume()
	require.NoError(t, <-heldErr)
	roundTrip(t, c, 8192, 2)
}
