package server_test

import (
	"context"
	"errors"
	"net"
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

// policy is a SessionPolicy for tests: it admits one export name (any
// when empty) and records how sessions ended.
type policy struct {
	name      string
	exclusive bool
	mu        sync.Mutex
	ended     []server.SessionEnd
	endedCh   chan struct{}
}

func newPolicy(name string, exclusive bool) *policy {
	return &policy{name: name, exclusive: exclusive, endedCh: make(chan struct{}, 16)}
}

func (p *policy) Allow(name string) error {
	if p.name != "" && name != p.name {
		return errors.New("only " + p.name + " is served here")
	}
	return nil
}

func (p *policy) Exclusive() bool { return p.exclusive }

func (p *policy) Ended(e server.SessionEnd) {
	p.mu.Lock()
	p.ended = append(p.ended, e)
	p.mu.Unlock()
	p.endedCh <- struct{}{}
}

func (p *policy) next(t *testing.T) server.SessionEnd {
	t.Helper()
	select {
	case <-p.endedCh:
	case <-time.After(10 * time.Second):
		t.Fatal("no session ended")
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.ended[0]
	p.ended = p.ended[1:]
	return e
}

func dialName(addr, name string) (*nbd.Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	return nbd.Dial(ctx, "tcp", addr, &nbd.ClientOptions{ExportName: name})
}

// A refused client hears why in the handshake: NBD_REP_ERR_POLICY and the
// policy's words; the admitted name still works.
func TestSessionPolicyRefusesInTheHandshake(t *testing.T) {
	p := newPolicy("source", false)
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Sessions: p}})
	_, err := dialName(inst.Addr, "")
	var oe *nbd.OptionError
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, nbd.RepErrPolicy, oe.Rep)
	assert.Equal(t, "only source is served here", oe.Message)

	c, err := dialName(inst.Addr, "source")
	require.NoError(t, err)
	defer c.Close()
	roundTrip(t, c, 0, 1)
}

// An oldstyle client cannot be told anything: it is disconnected before
// the greeting.
func TestSessionPolicyRefusesOldstyleBeforeTheGreeting(t *testing.T) {
	p := newPolicy("nobody-oldstyle-can-ask-for", false)
	inst := oldstyleMode.start(t, testserver.Options{Config: server.Config{Sessions: p}})
	nc, err := net.Dial("tcp", inst.Addr)
	require.NoError(t, err)
	defer nc.Close()
	require.NoError(t, nc.SetReadDeadline(time.Now().Add(10*time.Second)))
	n, err := nc.Read(make([]byte, 16))
	assert.Zero(t, n)
	assert.Error(t, err)
}

// The end of each session is reported with what a migration destination
// needs to call it complete: DISC, and a successful FLUSH as the last
// request before it.
func TestSessionEndReportsDisconnectAndFinalFlush(t *testing.T) {
	p := newPolicy("", false)
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Sessions: p}})
	ctx := testCtx(t)

	c := inst.Dial(t, &nbd.ClientOptions{ExportName: "x"})
	require.NoError(t, c.Write(ctx, pattern(1, 4096), 0, 0))
	require.NoError(t, c.Flush(ctx))
	require.NoError(t, c.Close())
	e := p.next(t)
	assert.True(t, e.Disconnected)
	assert.True(t, e.FlushedLast)
	assert.EqualValues(t, 2, e.Requests)
	assert.Equal(t, "x", e.ExportName)

	c = inst.Dial(t, nil)
	require.NoError(t, c.Flush(ctx))
	require.NoError(t, c.Write(ctx, pattern(2, 4096), 0, 0))
	require.NoError(t, c.Close())
	e = p.next(t)
	assert.True(t, e.Disconnected)
	assert.False(t, e.FlushedLast, "a write after the last flush")

	r := dialRaw(t, inst.Addr)
	require.NoError(t, r.send(nbd.Request{Type: nbd.CmdFlush, Cookie: 1}, nil))
	_, err := r.reply()
	require.NoError(t, err)
	r.nc.Close()
	e = p.next(t)
	assert.False(t, e.Disconnected, "the connection broke without DISC")
	assert.True(t, e.FlushedLast)
}

// A failed FLUSH does not count as one.
func TestSessionEndFailedFlushIsNotAFlush(t *testing.T) {
	p := newPolicy("", false)
	be := wrapFile(t)
	var failed atomic.Bool
	be.sync = func() error {
		if failed.CompareAndSwap(false, true) {
			return errors.New("disk failed")
		}
		return be.Backend.Sync()
	}
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be, Sessions: p}})
	c := inst.Dial(t, nil)
	require.Error(t, c.Flush(testCtx(t)))
	require.NoError(t, c.Close())
	e := p.next(t)
	assert.True(t, e.Disconnected)
	assert.False(t, e.FlushedLast)
}

// With an exclusive policy a new session replaces the old one: the old
// connection finishes what it had received, runs nothing it receives
// afterwards, and is gone before the new session's first request runs.
func TestExclusiveSessionReplacesThePreviousOne(t *testing.T) {
	p := newPolicy("", true)
	be := wrapFile(t)
	st := newStall(t, 1<<20, 2<<20)
	var order []uint64
	var mu sync.Mutex
	var late atomic.Int64
	be.write = func(b []byte, off uint64, fua bool) error {
		if st.covers(off, len(b)) {
			st.hold()
		}
		if off == 3<<20 {
			late.Add(1)
		}
		mu.Lock()
		order = append(order, off)
		mu.Unlock()
		return be.Backend.WriteAt(b, off, fua)
	}
	inst := testserver.Start(t, testserver.Options{Config: server.Config{Backend: be, Sessions: p}})
	st.releaseBeforeShutdown(t)
	ctx := testCtx(t)

	old := inst.Dial(t, nil)
	oldErr := make(chan error, 1)
	go func() { oldErr <- old.Write(ctx, pattern(1, 4096), 1<<20, 0) }()
	st.awaitEntered(t, 1)

	newer := inst.Dial(t, nil)
	waitFor(t, "the old session to drain", func() bool { return inst.Server.DrainingClients() == 1 })
	lateErr := make(chan error, 1)
	go func() { lateErr <- old.Write(ctx, pattern(2, 4096), 3<<20, 0) }()

	newErr := make(chan error, 1)
	go func() { newErr <- newer.Write(ctx, pattern(3, 4096), 5<<20, 0) }()
	select {
	case err := <-newErr:
		t.Fatalf("the new session's write ran (%v) while the old one still had a write running", err)
	case <-time.After(50 * time.Millisecond):
	}
	st.Release()
	require.NoError(t, <-oldErr, "the old session's received write completes")
	require.NoError(t, <-newErr)
	require.Error(t, <-lateErr, "a request sent after the replacement is not run")
	assert.Zero(t, late.Load())
	mu.Lock()
	assert.Equal(t, []uint64{1 << 20, 5 << 20}, order)
	mu.Unlock()
	e := p.next(t)
	assert.False(t, e.Disconnected)
}

// With an export name configured, a client asking for another name fails
// with NBD_REP_ERR_UNKNOWN instead of silently using this export; the
// empty name (the default export), the configured one and the names the
// policy reserves still reach it.
func TestExportNameRefusesOtherNames(t *testing.T) {
	p := newPolicy("", false)
	inst := testserver.Start(t, testserver.Options{Config: server.Config{
		ExportName: "vm1", PolicyNames: []string{"reserved"}, Sessions: p,
	}})
	_, err := dialName(inst.Addr, "vm2")
	var oe *nbd.OptionError
	require.ErrorAs(t, err, &oe)
	assert.Equal(t, nbd.RepErrUnknown, oe.Rep)
	assert.Contains(t, oe.Message, `"vm2"`)

	for _, name := range []string{"", "vm1", "reserved"} {
		c, err := dialName(inst.Addr, name)
		require.NoError(t, err, "export %q", name)
		roundTrip(t, c, 0, 1)
		c.Close()
	}
}

// Without an export name, every name reaches the one export, as the C
// flexnbd's clients and older scripts expect.
func TestNoExportNameServesAnyName(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{})
	c, err := dialName(inst.Addr, "anything")
	require.NoError(t, err)
	defer c.Close()
	roundTrip(t, c, 0, 1)
}
