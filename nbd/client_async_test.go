package nbd

import (
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

type asyncResult struct {
	ext []Extent
	err error
}

// StartAsync queues small requests until FlushRequests sends them together,
// in order, and delivers each reply to its callback as it comes, whatever
// the order of the replies; OnIdle runs once the replies at hand are
// handled.
func TestClientStartAsync(t *testing.T) {
	idle := make(chan struct{}, 16)
	c, s := newClientPair(t, ClientOptions{OnIdle: func() {
		select {
		case idle <- struct{}{}:
		default:
		}
	}})
	results := make([]chan asyncResult, 3)
	for i := range results {
		results[i] = make(chan asyncResult, 1)
	}
	cb := func(i int) func([]Extent, error) {
		return func(ext []Extent, err error) { results[i] <- asyncResult{ext, err} }
	}
	buf := make([]byte, 512)
	payload := pattern(7, 100)
	require.NoError(t, c.StartAsync(Request{Type: CmdWrite, Offset: 4096, Length: 100}, payload, nil, cb(0)))
	require.NoError(t, c.StartAsync(Request{Type: CmdRead, Offset: 0, Length: 512}, nil, buf, cb(1)))
	require.NoError(t, c.StartAsync(Request{Type: CmdFlush}, nil, nil, cb(2)))

	sent := make(chan []Request, 1)
	go func() {
		var reqs []Request
		for range 3 {
			reqs = append(reqs, s.request())
			if reqs[len(reqs)-1].Type == CmdWrite {
				got := make([]byte, 100)
				_, err := s.r.Read(got)
				if err != nil {
					break
				}
			}
		}
		sent <- reqs
	}()
	select {
	case <-sent:
		t.Fatal("queued requests went out before FlushRequests")
	case <-time.After(50 * time.Millisecond):
	}
	require.NoError(t, c.FlushRequests())
	reqs := <-sent
	require.Len(t, reqs, 3)
	assert.Equal(t, []Cmd{CmdWrite, CmdRead, CmdFlush}, []Cmd{reqs[0].Type, reqs[1].Type, reqs[2].Type}, "in the order started")

	// Replies in another order: each reaches its own callback.
	s.send(AppendSimpleReply(nil, 0, reqs[2].Cookie))
	s.send(AppendSimpleReply(nil, EPERM, reqs[0].Cookie))
	s.send(AppendOffsetDataHeader(nil, ReplyFlagDone, reqs[1].Cookie, 0, 512), pattern(9, 512))
	r := <-results[2]
	assert.NoError(t, r.err)
	r = <-results[0]
	assert.ErrorIs(t, r.err, EPERM)
	r = <-results[1]
	assert.NoError(t, r.err)
	assert.Equal(t, pattern(9, 512), buf)
	select {
	case <-idle:
	case <-time.After(testTimeout):
		t.Fatal("OnIdle never ran")
	}
}

// When the connection dies, every outstanding callback hears it, with an
// error that is not a server's reply.
func TestClientStartAsyncConnectionLost(t *testing.T) {
	c, s := newClientPair(t, ClientOptions{})
	var wg sync.WaitGroup
	errs := make([]error, 4)
	for i := range errs {
		wg.Add(1)
		require.NoError(t, c.StartAsync(Request{Type: CmdFlush}, nil, nil, func(_ []Extent, err error) {
			errs[i] = err
			wg.Done()
		}))
	}
	read := make(chan struct{})
	go func() {
		defer close(read)
		for range errs {
			s.request()
		}
	}()
	require.NoError(t, c.FlushRequests()) // a pipe: returns once read
	<-read
	s.conn.Close()
	wg.Wait()
	for _, err := range errs {
		require.Error(t, err)
		var errno Errno
		assert.False(t, errors.As(err, &errno), "a lost connection is not an errno: %v", err)
	}
	assert.Error(t, c.StartAsync(Request{Type: CmdFlush}, nil, nil, func([]Extent, error) {}),
		"a dead client refuses new requests")
}
