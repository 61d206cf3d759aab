package rawsock

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func pair(t *testing.T) (net.Conn, net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	defer l.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, _ := l.Accept()
		accepted <- c
	}()
	a, err := net.Dial("tcp", l.Addr().String())
	require.NoError(t, err)
	b := <-accepted
	require.NotNil(t, b)
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// Many buffers, more than one writev takes and larger than the socket
// buffers, arrive whole and in order while the peer reads slowly.
func TestWritevDeliversEverythingInOrder(t *testing.T) {
	a, b := pair(t)
	w := New(a)
	require.NotNil(t, w)
	var bufs [][]byte
	var want []byte
	for i := range 300 {
		p := bytes.Repeat([]byte{byte(i)}, 1+i*97%20000)
		if i%7 == 0 {
			p = nil // empty buffers are skipped
		}
		bufs = append(bufs, p)
		want = append(want, p...)
	}
	got := make(chan []byte, 1)
	go func() {
		var out []byte
		buf := make([]byte, 1000)
		for len(out) < len(want) {
			time.Sleep(50 * time.Microsecond)
			n, err := b.Read(buf)
			if err != nil {
				break
			}
			out = append(out, buf[:n]...)
		}
		got <- out
	}()
	n, err := w.Writev(bufs)
	require.NoError(t, err)
	assert.Equal(t, int64(len(want)), n)
	assert.Equal(t, want, <-got)
}

// Read returns what is there, io.EOF once the peer closed, and honours
// the connection's read deadline.
func TestReadDataEOFAndDeadline(t *testing.T) {
	a, b := pair(t)
	r := New(a)
	require.NoError(t, a.SetReadDeadline(time.Now().Add(20*time.Millisecond)))
	_, err := r.Read(make([]byte, 10))
	require.ErrorIs(t, err, os.ErrDeadlineExceeded)
	require.NoError(t, a.SetReadDeadline(time.Time{}))

	_, err = b.Write([]byte("hello"))
	require.NoError(t, err)
	buf := make([]byte, 10)
	n, err := io.ReadAtLeast(r, buf, 5)
	require.NoError(t, err)
	assert.Equal(t, "hello", string(buf[:n]))
	b.Close()
	_, err = r.Read(buf)
	assert.True(t, errors.Is(err, io.EOF), "got %v", err)
}

// A write to a peer that has gone reports an error rather than hanging.
func TestWriteToClosedPeerFails(t *testing.T) {
	a, b := pair(t)
	w := New(a)
	b.Close()
	big := make([]byte, 1<<20)
	var err error
	for range 50 {
		if _, err = w.Write(big); err != nil {
			break
		}
	}
	require.Error(t, err)
}
