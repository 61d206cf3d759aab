package server_test

import (
	"bytes"
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

func dialFence(addr, key string, gen uint64) (*nbd.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return nbd.Dial(ctx, "tcp", addr, &nbd.ClientOptions{FenceKey: key, FenceGen: gen})
}

// A newer connection of a fence key starts only once the older one has
// finished what it was running, replaces it, and refuses the older
// generation afterwards. This is what lets a proxy send unanswered
// requests again on a new connection without an original overtaking them.
func TestFenceReplacesTheOlderConnection(t *testing.T) {
	be := wrapFile(t)
	st := newStall(t, 0, 4096)
	be.write = func(p []byte, off uint64, fua bool) error {
		if st.covers(off, len(p)) {
			st.hold()
		}
		return be.Backend.WriteAt(p, off, fua)
	}
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be}})
	st.releaseBeforeShutdown(t)
	ctx := testCtx(t)

	old, err := dialFence(inst.Addr, "vm-1", 1)
	require.NoError(t, err)
	defer old.Close()
	require.True(t, old.Session().Fenced, "our server takes the fence")
	stamp := bytes.Repeat([]byte{0xa5}, 4096)
	oldWrite := make(chan error, 1)
	go func() { oldWrite <- old.Write(ctx, stamp, 0, 0) }()
	st.awaitEntered(t, 1)

	// An unrelated client is not held up by the fence.
	other := inst.Dial(t, nil)
	roundTrip(t, other, 1<<20, 3)

	type result struct {
		c    *nbd.Client
		data []byte
		err  error
	}
	newer := make(chan result, 1)
	go func() {
		c, err := dialFence(inst.Addr, "vm-1", 2)
		if err != nil {
			newer <- result{err: err}
			return
		}
		p := make([]byte, 4096)
		err = c.Read(ctx, p, 0, 0)
		newer <- result{c, p, err}
	}()
	select {
	case r := <-newer:
		t.Fatalf("the newer connection was served while the older one still ran a write: %v", r.err)
	case <-time.After(200 * time.Millisecond):
	}
	st.Release()
	r := <-newer
	require.NoError(t, r.err)
	defer r.c.Close()
	assert.Equal(t, stamp, r.data, "the newer connection sees the older one's write done")
	<-oldWrite // answered or not: its connection was replaced
	assert.Error(t, old.Write(ctx, stamp, 8192, 0), "the older connection is closed")

	_, err = dialFence(inst.Addr, "vm-1", 1)
	var oe *nbd.OptionError
	require.ErrorAs(t, err, &oe, "an older generation is refused while the newer one lives")
	assert.Equal(t, nbd.RepErrPolicy, oe.Rep)
	assert.Contains(t, oe.Message, "newer connection")
}
