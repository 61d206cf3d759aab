package main

import (
	"context"
	"net"
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

// slowSync is a destination backend whose flushes wait for release while
// the source is held: it keeps a migration in its freeze.
type slowSync struct {
	server.Backend
	held    func() bool
	release chan struct{}
}

func (b *slowSync) Sync() error {
	if b.held() {
		<-b.release
	}
	return b.Backend.Sync()
}

// During the freeze status says so, and clients_allowed=false; after a
// migration with the nothing action, is_mirroring is false again, the
// freeze is shown, and break says the migration completed.
func TestStatusThroughAMigration(t *testing.T) {
	src, ctl := ctlServe(t, nil, false)
	file, err := server.OpenFile(testserver.Start(t, testserver.Options{Size: 4 << 20}).Path, false)
	require.NoError(t, err)
	t.Cleanup(func() { file.Close() })
	be := &slowSync{Backend: file, held: src.Server.Held, release: make(chan struct{})}
	dest := &mirror.Destination{}
	dst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be, Sessions: dest}})
	released := false
	t.Cleanup(func() {
		if !released {
			close(be.release)
		}
	})

	host, port := splitAddr(t, dst.Addr)
	r, err := ctl.Do(context.Background(), control.CmdMirror, host, port, "nothing")
	require.NoError(t, err)
	require.Equal(t, "0: Mirror started", r.String())

	var st map[string]string
	require.Eventually(t, func() bool {
		st = ctlStatus(t, ctl)
		return st["migration_mode"] == "freeze"
	}, ctlTimeout, time.Millisecond)
	assert.Equal(t, "true", st["is_mirroring"])
	assert.Equal(t, "false", st["clients_allowed"])
	for _, key := range []string{"migration_speed", "migration_duration", "migration_seconds_left",
		"migration_bytes_left", "migration_pass", "migration_attempts", "migration_bytes_sent"} {
		assert.Contains(t, st, key)
	}
	r, err = ctl.Do(context.Background(), control.CmdMirror, host, port)
	require.NoError(t, err)
	assert.Equal(t, "1: mirror already running", r.String())

	close(be.release)
	released = true
	select {
	case <-dest.Complete():
	case <-time.After(ctlTimeout):
		t.Fatal("destination never completed")
	}
	require.Eventually(t, func() bool { return ctlStatus(t, ctl)["is_mirroring"] == "false" }, ctlTimeout, time.Millisecond)
	st = ctlStatus(t, ctl)
	assert.Equal(t, "true", st["clients_allowed"])
	assert.Contains(t, st, "migration_last_freeze_ms")
	r, err = ctl.Do(context.Background(), control.CmdBreak)
	require.NoError(t, err)
	assert.Equal(t, "1: mirror completed", r.String())
}

// A listen instance has no control, and so cannot migrate, until its own
// migration completed.
func TestListenCannotMirrorBeforeTheHandOff(t *testing.T) {
	dest := &mirror.Destination{}
	inst := testserver.Start(t, testserver.Options{Size: 1 << 20, Config: server.Config{Sessions: dest}})
	h := newInstance(inst.Server, inst.File, inst.Path, dest, zerolog.Nop())
	st := h.Status()
	assert.False(t, st.HasControl)
	err := h.Mirror(context.Background(), control.MirrorRequest{})
	assert.ErrorIs(t, err, errNoControl)
}

func splitAddr(t *testing.T, addr string) (string, string) {
	host, port, err := net.SplitHostPort(addr)
	require.NoError(t, err)
	return host, port
}
