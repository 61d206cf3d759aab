package main

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/server"
)

// The STATUS= line follows a migration on both sides: the destination
// waits, then receives; the source names its target, pass and progress;
// both serve once it is over. The destination's flush is held so that
// the migration stays in progress while the lines are read.
func TestNotifyStatusThroughAMigration(t *testing.T) {
	srcPath := scratch(t, 4<<20, randomData(1<<20, 3))
	srcFile := testserver.Start(t, testserver.Options{Path: srcPath})
	srcInst := newInstance(srcFile.Server, srcFile.File, srcFile.Path, nil, zerolog.Nop())
	assert.Equal(t, "serving 0 clients", instanceStatus(srcInst))

	file, err := server.OpenFile(testserver.Start(t, testserver.Options{Size: 4 << 20}).Path, false)
	require.NoError(t, err)
	t.Cleanup(func() { file.Close() })
	be := &slowSync{Backend: file, held: srcFile.Server.Held, release: make(chan struct{})}
	dest := &mirror.Destination{}
	dst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be, Sessions: dest}})
	dstInst := newInstance(dst.Server, file, "", dest, zerolog.Nop())
	assert.Equal(t, "waiting for a migration", instanceStatus(dstInst))
	released := false
	t.Cleanup(func() {
		if !released {
			close(be.release)
		}
	})

	target := netip.MustParseAddrPort(dst.Addr)
	require.NoError(t, srcInst.Mirror(context.Background(), control.MirrorRequest{
		Target: target, Action: control.ActionNothing, MaxBytesPerSecond: control.NoSpeedLimit,
	}))
	require.Eventually(t, srcFile.Server.Held, ctlTimeout, time.Millisecond, "the freeze")
	assert.Regexp(t, `^migrating to `+dst.Addr+`: pass [1-9][0-9]*, [0-9]+% done, [0-9.]+ (B|KiB|MiB) left$`, instanceStatus(srcInst))
	assert.Regexp(t, `^receiving a migration: [1-9][0-9.]* (B|KiB|MiB) written$`, instanceStatus(dstInst))

	close(be.release)
	released = true
	select {
	case <-dest.Complete():
	case <-time.After(ctlTimeout):
		t.Fatal("destination never completed")
	}
	require.Eventually(t, func() bool { return srcInst.running() == nil }, ctlTimeout, time.Millisecond)
	assert.Regexp(t, `^serving [0-9]+ clients$`, instanceStatus(srcInst))
	assert.Regexp(t, `^serving [0-9]+ clients$`, instanceStatus(dstInst))
}
