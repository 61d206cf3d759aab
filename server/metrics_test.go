package server_test

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// figures returns the figures of one command by name.
func figures(t *testing.T, m *server.Metrics, cmd string) server.CommandFigures {
	t.Helper()
	for _, f := range m.Commands() {
		if f.Command == cmd {
			return f
		}
	}
	t.Fatalf("no figures for %q", cmd)
	return server.CommandFigures{}
}

// A request that finds an overlapping one ahead of it in the ordering
// gate is counted once as a gate wait; one on another range is not.
func TestMetricsCountGateWaits(t *testing.T) {
	const at = 8 << 20
	be, st := stalledReads(t, at, at+4096)
	var m server.Metrics
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be, Metrics: &m}})
	st.releaseBeforeShutdown(t)
	c := inst.Dial(t, nil)
	ctx := testCtx(t)
	// Data, not a hole: a hole is answered without reading the backend.
	require.NoError(t, c.Write(ctx, pattern(1, 4096), at, 0))

	readDone := make(chan error, 1)
	go func() { readDone <- c.Read(ctx, make([]byte, 4096), at, 0) }()
	st.awaitEntered(t, 1)
	require.NoError(t, c.Write(ctx, pattern(1, 4096), at+(1<<20), 0), "a write elsewhere")
	writeDone := make(chan error, 1)
	go func() { writeDone <- c.Write(ctx, pattern(2, 4096), at, 0) }()
	waitFor(t, "the overlapping write to wait in the gate", func() bool { return m.GateWaits() == 1 })
	st.Release()
	require.NoError(t, <-readDone)
	require.NoError(t, <-writeDone)

	assert.Equal(t, uint64(1), m.GateWaits())
	assert.Equal(t, uint64(3), figures(t, &m, "write").Requests)
	assert.Equal(t, uint64(3*4096), figures(t, &m, "write").Bytes)
	assert.Equal(t, uint64(1), figures(t, &m, "read").Requests)
}

// Refusals and backend failures are counted under their error code, and
// their bytes are not counted as moved.
func TestMetricsCountErrorsByErrno(t *testing.T) {
	var m server.Metrics
	inst := testserver.Start(t, testserver.Options{Size: 1 << 20, Config: server.Config{Metrics: &m}})
	c := inst.Dial(t, nil)
	ctx := testCtx(t)

	err := c.Read(ctx, make([]byte, 4096), 1<<20, 0)
	require.ErrorIs(t, err, nbd.EINVAL)
	err = c.Write(ctx, pattern(1, 4096), 1<<20, 0)
	require.ErrorIs(t, err, nbd.ENOSPC)
	require.NoError(t, c.Write(ctx, pattern(1, 4096), 0, 0))
	require.NoError(t, c.Flush(ctx))

	counts := map[string]uint64{}
	for _, e := range m.Errors() {
		counts[e.Errno] = e.Count
	}
	assert.Equal(t, uint64(1), counts["EINVAL"])
	assert.Equal(t, uint64(1), counts["ENOSPC"])
	assert.Equal(t, uint64(0), counts["EIO"])
	read, write := figures(t, &m, "read"), figures(t, &m, "write")
	assert.Equal(t, uint64(1), read.Requests)
	assert.Equal(t, uint64(0), read.Bytes)
	assert.Equal(t, uint64(2), write.Requests)
	assert.Equal(t, uint64(4096), write.Bytes)
	assert.Equal(t, uint64(1), figures(t, &m, "flush").Requests)
	var inBuckets uint64
	for _, n := range write.Buckets {
		inBuckets += n
	}
	assert.Equal(t, write.Requests, inBuckets)
	assert.Positive(t, write.Latency)
}
