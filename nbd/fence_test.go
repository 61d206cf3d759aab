package nbd

import (
	"bufio"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// handshakeWith runs a client handshake with opts against a server
// configured by cfg and returns both sides' sessions.
func handshakeWith(t *testing.T, opts ClientOptions, cfg *ServerConfig) (*Session, *Session, error) {
	t.Helper()
	cc, sc := pipe(t)
	ch := make(chan handshakeResult, 1)
	go func() {
		sess, err := ServerHandshake(bufio.NewReader(sc), sc, cfg)
		ch <- handshakeResult{sess, err}
		if err != nil {
			sc.Close()
		}
	}()
	c, err := NewClient(cc, &opts)
	if err != nil {
		cc.Close()
		r := waitServer(t, ch)
		return nil, r.sess, err
	}
	r := waitServer(t, ch)
	t.Cleanup(func() { sc.Close() })
	s := c.Session()
	return &s, r.sess, nil
}

func TestFenceOption(t *testing.T) {
	t.Run("accepted", func(t *testing.T) {
		cfg := testServerConfig()
		var gotKey string
		var gotGen uint64
		cfg.Fence = func(key string, gen uint64) error { gotKey, gotGen = key, gen; return nil }
		cs, ss, err := handshakeWith(t, ClientOptions{FenceKey: "vm-7", FenceGen: 3}, cfg)
		require.NoError(t, err)
		assert.True(t, cs.Fenced)
		assert.Equal(t, "vm-7", gotKey)
		assert.Equal(t, uint64(3), gotGen)
		assert.Equal(t, "vm-7", ss.FenceKey)
		assert.Equal(t, uint64(3), ss.FenceGen)
		assert.True(t, cs.Structured, "the rest of the negotiation goes on")
	})
	t.Run("unknown to the server", func(t *testing.T) {
		cs, ss, err := handshakeWith(t, ClientOptions{FenceKey: "vm-7", FenceGen: 1}, testServerConfig())
		require.NoError(t, err)
		assert.False(t, cs.Fenced, "a server without fences says UNSUP and the client goes on")
		assert.Empty(t, ss.FenceKey)
	})
	t.Run("refused", func(t *testing.T) {
		cfg := testServerConfig()
		cfg.Fence = func(string, uint64) error { return errors.New("a newer connection of this session exists") }
		_, _, err := handshakeWith(t, ClientOptions{FenceKey: "vm-7", FenceGen: 1}, cfg)
		var oe *OptionError
		require.ErrorAs(t, err, &oe)
		assert.Equal(t, RepErrPolicy, oe.Rep)
		assert.Equal(t, "a newer connection of this session exists", oe.Message)
	})
	t.Run("key too long", func(t *testing.T) {
		cfg := testServerConfig()
		cfg.Fence = func(string, uint64) error { return nil }
		long := string(make([]byte, MaxFenceKey+1))
		_, _, err := handshakeWith(t, ClientOptions{FenceKey: long}, cfg)
		require.Error(t, err)
	})
}
