package accept

import (
	"errors"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/require"
)

// flakyListener fails its first accepts with err, then accepts from the
// real listener.
type flakyListener struct {
	net.Listener
	fails atomic.Int32
	err   error
}

func (f *flakyListener) Accept() (net.Conn, error) {
	if f.fails.Add(-1) >= 0 {
		return nil, f.err
	}
	return f.Listener.Accept()
}

func TestLoopRidesOutPassingErrors(t *testing.T) {
	real, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	fl := &flakyListener{Listener: real, err: &net.OpError{Op: "accept", Err: syscall.EMFILE}}
	fl.fails.Store(3)
	var closing atomic.Bool
	got := make(chan net.Conn, 1)
	done := make(chan error, 1)
	go func() {
		done <- Loop(fl, closing.Load, zerolog.Nop(), func(c net.Conn) { got <- c })
	}()

	c, err := net.Dial("tcp", real.Addr().String())
	require.NoError(t, err)
	defer c.Close()
	select {
	case sc := <-got:
		sc.Close()
	case <-time.After(10 * time.Second):
		t.Fatal("no connection handled after descriptor exhaustion passed")
	}

	closing.Store(true)
	real.Close()
	require.NoError(t, <-done, "a listener closed on purpose ends the loop cleanly")
}

func TestLoopReturnsLastingErrors(t *testing.T) {
	real, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	real.Close() // closed, but not by an owner that is closing
	err = Loop(real, func() bool { return false }, zerolog.Nop(), func(net.Conn) { t.Error("nothing to accept") })
	require.True(t, errors.Is(err, net.ErrClosed), "got %v", err)
}
