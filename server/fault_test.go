package server_test

import (
	"errors"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// badOff starts the range where the fault-injecting backends misbehave.
const badOff = 40 << 20

func inBadRange(off uint64, n uint64) bool { return off < badOff+1<<20 && badOff < off+n }

// A backend failure is that request's error reply, with the closest NBD
// code; the connection and the export carry on.
func TestBackendErrorsBecomeErrorReplies(t *testing.T) {
	errDisk := errors.New("medium error")
	tests := []struct {
		name string
		fail error
		do   func(*testing.T, *nbd.Client) error
		want nbd.Errno
	}{
		{"read, unknown error", errDisk, func(t *testing.T, c *nbd.Client) error {
			return c.Read(testCtx(t), make([]byte, 4096), badOff, 0)
		}, nbd.EIO},
		{"large read, unknown error", errDisk, func(t *testing.T, c *nbd.Client) error {
			return c.Read(testCtx(t), make([]byte, 512<<10), badOff, 0)
		}, nbd.EIO},
		{"write, unknown error", errDisk, func(t *testing.T, c *nbd.Client) error {
			return c.Write(testCtx(t), pattern(1, 4096), badOff, 0)
		}, nbd.EIO},
		{"write, disk full", syscall.ENOSPC, func(t *testing.T, c *nbd.Client) error {
			return c.Write(testCtx(t), pattern(1, 4096), badOff, 0)
		}, nbd.ENOSPC},
		{"fua write, read-only file system", syscall.EROFS, func(t *testing.T, c *nbd.Client) error {
			return c.Write(testCtx(t), pattern(1, 4096), badOff, nbd.CmdFlagFUA)
		}, nbd.EPERM},
		{"trim, unknown error", errDisk, func(t *testing.T, c *nbd.Client) error {
			return c.Trim(testCtx(t), badOff, 4096, 0)
		}, nbd.EIO},
		{"write zeroes, wrapped errno", errors.Join(errDisk, syscall.EOVERFLOW), func(t *testing.T, c *nbd.Client) error {
			return c.WriteZeroes(testCtx(t), badOff, 4096, 0)
		}, nbd.EOVERFLOW},
		{"fast zero the backend cannot do", nbd.ENOTSUP, func(t *testing.T, c *nbd.Client) error {
			return c.WriteZeroes(testCtx(t), badOff, 4096, nbd.CmdFlagFastZero)
		}, nbd.ENOTSUP},
	}
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					be := wrapFile(t)
					// Data, so that structured reads reach ReadAt.
					require.NoError(t, be.Backend.WriteAt(pattern(2, 1<<20), badOff, false))
					be.read = func(p []byte, off uint64, nowait bool) error {
						if inBadRange(off, uint64(len(p))) {
							return tt.fail
						}
						return be.Backend.ReadAt(p, off, nowait)
					}
					be.write = func(p []byte, off uint64, fua bool) error {
						if inBadRange(off, uint64(len(p))) {
							return tt.fail
						}
						return be.Backend.WriteAt(p, off, fua)
					}
					be.trim = func(off, length uint64) error { return tt.fail }
					be.zero = func(off, length uint64, noHole, fast bool) error { return tt.fail }
					inst := m.start(t, testserver.Options{Config: server.Config{Backend: be}})
					c := m.dial(t, inst)

					require.ErrorIs(t, tt.do(t, c), tt.want)
					require.NoError(t, c.Err())
					roundTrip(t, c, 0, 3)
					assert.EqualValues(t, 1, inst.Server.Stats().Errors)
					assert.Zero(t, inst.Server.GatePending(), "a failed request must release its range")
				})
			}
		})
	}
}

// When the backend cannot make data durable, every request that promised
// durability says so.
func TestFailedSyncFailsDurabilityRequests(t *testing.T) {
	tests := []struct {
		name string
		do   func(*testing.T, *nbd.Client) error
	}{
		{"flush", func(t *testing.T, c *nbd.Client) error { return c.Flush(testCtx(t)) }},
		{"fua trim", func(t *testing.T, c *nbd.Client) error { return c.Trim(testCtx(t), 0, 4096, nbd.CmdFlagFUA) }},
		{"fua write zeroes", func(t *testing.T, c *nbd.Client) error {
			return c.WriteZeroes(testCtx(t), 0, 4096, nbd.CmdFlagFUA)
		}},
	}
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					var broken atomic.Bool
					broken.Store(true)
					be := wrapFile(t)
					be.sync = func() error {
						if broken.Load() {
							return syscall.EIO
						}
						return be.Backend.Sync()
					}
					inst := m.start(t, testserver.Options{Config: server.Config{Backend: be}})
					c := m.dial(t, inst)
					require.ErrorIs(t, tt.do(t, c), nbd.EIO)
					broken.Store(false)
					require.NoError(t, tt.do(t, c), "the same request once the disk recovered")
				})
			}
		})
	}
}

// A bug that panics inside one request must cost that request only: it is
// answered with EIO, its range is released, and the server keeps serving
// that client and the others.
func TestBackendPanicIsContained(t *testing.T) {
	tests := []struct {
		name string
		do   func(*testing.T, *nbd.Client) error
	}{
		{"small read, run on the reader", func(t *testing.T, c *nbd.Client) error {
			return c.Read(testCtx(t), make([]byte, 4096), badOff, 0)
		}},
		{"large read, run on a goroutine", func(t *testing.T, c *nbd.Client) error {
			return c.Read(testCtx(t), make([]byte, 512<<10), badOff, 0)
		}},
		{"small write, run on the reader", func(t *testing.T, c *nbd.Client) error {
			return c.Write(testCtx(t), pattern(4, 4096), badOff, 0)
		}},
		{"fua write, run on a goroutine", func(t *testing.T, c *nbd.Client) error {
			return c.Write(testCtx(t), pattern(4, 4096), badOff, nbd.CmdFlagFUA)
		}},
		{"write zeroes", func(t *testing.T, c *nbd.Client) error {
			return c.WriteZeroes(testCtx(t), badOff, 4096, 0)
		}},
	}
	for _, m := range []mode{structuredMode, simpleMode} {
		t.Run(m.name, func(t *testing.T) {
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					be := wrapFile(t)
					require.NoError(t, be.Backend.WriteAt(pattern(2, 1<<20), badOff, false))
					be.read = func(p []byte, off uint64, nowait bool) error {
						if inBadRange(off, uint64(len(p))) {
							panic("backend bug")
						}
						return be.Backend.ReadAt(p, off, nowait)
					}
					be.write = func(p []byte, off uint64, fua bool) error {
						if inBadRange(off, uint64(len(p))) {
							panic("backend bug")
						}
						return be.Backend.WriteAt(p, off, fua)
					}
					be.zero = func(off, length uint64, noHole, fast bool) error { panic("backend bug") }
					inst := m.start(t, testserver.Options{Config: server.Config{Backend: be}})
					c := m.dial(t, inst)
					other := m.dial(t, inst)

					require.ErrorIs(t, tt.do(t, c), nbd.EIO)
					roundTrip(t, c, 0, 5)
					roundTrip(t, other, 8192, 6)
					// The range is free again: an overlapping request
					// does not wait for the crashed one.
					buf := make([]byte, 4096)
					require.NoError(t, other.Read(testCtx(t), buf, badOff-4096, 0))
					assert.Zero(t, inst.Server.GatePending())
					assert.Equal(t, 2, inst.Server.NumClients())
				})
			}
		})
	}
}

// The kill switch drops a client whose request hangs (a stuck disk, a
// wedged NFS mount) instead of letting it wait forever; clients whose
// requests complete are left alone.
func TestKillSwitchDropsClientWithStuckRequest(t *testing.T) {
	const stuckAt = 32 << 20
	be, st := stalledReads(t, stuckAt, stuckAt+1<<20)
	require.NoError(t, be.Backend.WriteAt(pattern(1, 4096), stuckAt, false))
	inst := testserver.Start(t, testserver.Options{Config: server.Config{
		Backend:    be,
		KillSwitch: 500 * time.Millisecond,
	}})
	st.releaseBeforeShutdown(t)
	stuck := inst.Dial(t, nil)
	healthy := inst.Dial(t, nil)
	waitFor(t, "both clients", func() bool { return inst.Server.NumClients() == 2 })

	ctx := testCtx(t)
	stuckErr := make(chan error, 1)
	go func() { stuckErr <- stuck.Read(ctx, make([]byte, 4096), stuckAt, 0) }()
	st.awaitEntered(t, 1)
	roundTrip(t, healthy, 0, 1) // unaffected while the other one hangs

	select {
	case err := <-stuckErr:
		require.Error(t, err, "the stuck request cannot have been answered")
	case <-time.After(10 * time.Second):
		t.Fatal("the kill switch did not drop the stuck client")
	}
	require.Error(t, stuck.Err(), "the stuck client's connection must be closed")
	waitFor(t, "the stuck client to be forgotten", func() bool { return inst.Server.NumClients() == 1 })
	for i := range 5 {
		roundTrip(t, healthy, uint64(i)*4096, uint64(10+i))
	}
	require.NoError(t, healthy.Err(), "a client with prompt replies must not be killed")

	// Once the disk answers, the abandoned request lets go of its range.
	st.Release()
	waitFor(t, "the stuck request to finish", func() bool { return inst.Server.GatePending() == 0 })
}
