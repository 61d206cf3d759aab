package main

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// ctlTimeout guards blocking steps so a bug fails instead of hanging;
// nothing waits for it to pass.
const ctlTimeout = 20 * time.Second

// ctlServe starts an NBD server with the given access list and its control
// socket, wired as `serve --sock` wires them.
func ctlServe(t *testing.T, entries []string, defaultDeny bool) (*testserver.Instance, *control.Client) {
	t.Helper()
	list, err := acl.New(entries, defaultDeny)
	require.NoError(t, err)
	inst := testserver.Start(t, testserver.Options{Size: 4 << 20, Config: server.Config{ACL: list}})
	path := filepath.Join(t.TempDir(), "ctl.sock")
	l, err := control.Listen(path)
	require.NoError(t, err)
	ctl := &control.Server{Handler: newInstance(inst.Server, inst.File, inst.Path, nil, zerolog.Nop())}
	served := make(chan error, 1)
	go func() { served <- ctl.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
		defer cancel()
		require.NoError(t, ctl.Shutdown(ctx))
		require.ErrorIs(t, <-served, control.ErrServerClosed)
	})
	return inst, &control.Client{Path: path, Timeout: ctlTimeout}
}

// ctlStatus asks for the status and returns its fields by name.
func ctlStatus(t *testing.T, c *control.Client) map[string]string {
	t.Helper()
	r, fields, err := c.Status(context.Background())
	require.NoError(t, err)
	require.True(t, r.OK(), r.String())
	m := make(map[string]string, len(fields))
	for _, f := range fields {
		m[f.Key] = f.Value
	}
	return m
}

func ctlNumClients(t *testing.T, c *control.Client) int {
	t.Helper()
	n, err := strconv.Atoi(ctlStatus(t, c)["num_clients"])
	require.NoError(t, err)
	return n
}

// ctlDialFrom connects an NBD client to addr from the local address from.
func ctlDialFrom(addr, from string) (*nbd.Client, error) {
	d := net.Dialer{Timeout: ctlTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}}
	nc, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	c, err := nbd.NewClient(nc, &nbd.ClientOptions{HandshakeTimeout: ctlTimeout})
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

func ctlRead(c *nbd.Client) error {
	ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
	defer cancel()
	return c.Read(ctx, make([]byte, 4096), 0, 0)
}

// TestControlNumClients: num_clients counts every connected client, idle
// and still negotiating ones too, and drops as they leave.
func TestControlNumClients(t *testing.T) {
	inst, ctl := ctlServe(t, nil, false)
	require.Equal(t, 0, ctlNumClients(t, ctl))

	var clients []*nbd.Client
	for i := 1; i <= 3; i++ {
		c, err := ctlDialFrom(inst.Addr, "127.0.0.1")
		require.NoError(t, err)
		defer c.Close()
		clients = append(clients, c)
		// The handshake is over, so the server has counted it.
		require.Equal(t, i, ctlNumClients(t, ctl))
	}

	// A peer that connected but has not negotiated yet counts as well;
	// the server takes it on asynchronously, hence the polling.
	raw, err := net.Dial("tcp", inst.Addr)
	require.NoError(t, err)
	require.Eventually(t, func() bool { return ctlNumClients(t, ctl) == 4 }, ctlTimeout, 5*time.Millisecond)
	raw.Close()
	require.Eventually(t, func() bool { return ctlNumClients(t, ctl) == 3 }, ctlTimeout, 5*time.Millisecond)

	for i, c := range clients {
		require.NoError(t, c.Close())
		want := len(clients) - 1 - i
		require.Eventually(t, func() bool { return ctlNumClients(t, ctl) == want }, ctlTimeout, 5*time.Millisecond)
	}
}

// TestControlACLKicksAndRefuses: a new list disconnects the connected
// client it rejects, keeps the one it admits, and applies to newcomers.
func TestControlACLKicksAndRefuses(t *testing.T) {
	inst, ctl := ctlServe(t, nil, false)
	kicked, err := ctlDialFrom(inst.Addr, "127.0.0.2")
	require.NoError(t, err)
	defer kicked.Close()
	kept, err := ctlDialFrom(inst.Addr, "127.0.0.1")
	require.NoError(t, err)
	defer kept.Close()
	require.NoError(t, ctlRead(kicked))
	require.Equal(t, 2, ctlNumClients(t, ctl))

	r, err := ctl.Do(context.Background(), control.CmdACL, "127.0.0.1")
	require.NoError(t, err)
	require.Equal(t, control.Reply{Code: 0, Message: "updated"}, r)

	require.Error(t, ctlRead(kicked), "the rejected client is disconnected")
	require.NoError(t, ctlRead(kept), "the admitted client carries on")

	_, err = ctlDialFrom(inst.Addr, "127.0.0.2")
	require.Error(t, err, "a newcomer the list rejects is refused")
	again, err := ctlDialFrom(inst.Addr, "127.0.0.1")
	require.NoError(t, err, "a newcomer the list admits is served")
	defer again.Close()
	require.NoError(t, ctlRead(again))

	require.Eventually(t, func() bool { return ctlNumClients(t, ctl) == 2 }, ctlTimeout, 5*time.Millisecond)
	require.Equal(t, "1", ctlStatus(t, ctl)["connections_rejected"])
	require.Equal(t, []string{"127.0.0.1"}, inst.Server.ACL().Entries())
}

// TestControlACLErrors: a bad entry is reported and changes nothing, and
// the default-deny setting survives a replacement.
func TestControlACLErrors(t *testing.T) {
	t.Run("bad entry changes nothing", func(t *testing.T) {
		inst, ctl := ctlServe(t, []string{"127.0.0.2"}, false)
		c, err := ctlDialFrom(inst.Addr, "127.0.0.2")
		require.NoError(t, err)
		defer c.Close()

		r, err := ctl.Do(context.Background(), control.CmdACL, "127.0.0.1", "127.0.0.300", "::1")
		require.NoError(t, err)
		require.Equal(t, control.Reply{Code: 1, Message: "bad spec: 127.0.0.300"}, r)

		require.Equal(t, []string{"127.0.0.2"}, inst.Server.ACL().Entries())
		require.NoError(t, ctlRead(c), "the connected client was not disconnected")
		_, err = ctlDialFrom(inst.Addr, "127.0.0.1")
		require.Error(t, err, "the old list still refuses")
	})
	t.Run("empty list keeps default deny", func(t *testing.T) {
		inst, ctl := ctlServe(t, []string{"127.0.0.1"}, true)
		c, err := ctlDialFrom(inst.Addr, "127.0.0.1")
		require.NoError(t, err)
		defer c.Close()

		r, err := ctl.Do(context.Background(), control.CmdACL)
		require.NoError(t, err)
		require.Equal(t, control.Reply{Code: 0, Message: "updated"}, r)
		require.True(t, inst.Server.ACL().DefaultDeny())
		require.Error(t, ctlRead(c), "an empty default-deny list admits nobody")
		_, err = ctlDialFrom(inst.Addr, "127.0.0.1")
		require.Error(t, err)
	})
	t.Run("empty list without default deny admits everyone", func(t *testing.T) {
		inst, ctl := ctlServe(t, []string{"127.0.0.1"}, false)
		r, err := ctl.Do(context.Background(), control.CmdACL)
		require.NoError(t, err)
		require.True(t, r.OK())
		c, err := ctlDialFrom(inst.Addr, "127.0.0.2")
		require.NoError(t, err)
		defer c.Close()
		require.NoError(t, ctlRead(c))
	})
}

// TestControlServeReplies: commands without a migration to act on, and a
// mirror to a port nobody listens on, fail with the C flexnbd's words.
func TestControlServeReplies(t *testing.T) {
	_, ctl := ctlServe(t, nil, false)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	closedPort := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	tests := []struct {
		command string
		args    []string
		want    control.Reply
	}{
		{control.CmdBreak, nil, control.Reply{Code: 1, Message: "not mirroring"}},
		{control.CmdMirrorMaxBps, []string{"1000"}, control.Reply{Code: 1, Message: "Not currently mirroring"}},
		{control.CmdMirror, []string{"127.0.0.1", closedPort}, control.Reply{Code: 1, Message: "Mirror failed to connect"}},
		{"frobnicate", nil, control.Reply{Code: 10, Message: "unknown command"}},
	}
	for _, tt := range tests {
		t.Run(tt.command, func(t *testing.T) {
			r, err := ctl.Do(context.Background(), tt.command, tt.args...)
			require.NoError(t, err)
			require.Equal(t, tt.want, r)
		})
	}
	st := ctlStatus(t, ctl)
	require.Equal(t, "false", st["is_mirroring"])
	require.Equal(t, "true", st["has_control"])
	require.Equal(t, "true", st["clients_allowed"])
	require.Equal(t, strconv.Itoa(4<<20), st["size"])
}

// TestControlUnderLoad: control conversations from several goroutines at
// once are all answered while NBD clients keep the server busy, and what
// status reports follows the traffic.
func TestControlUnderLoad(t *testing.T) {
	inst, ctl := ctlServe(t, []string{"127.0.0.0/8"}, false)
	const loaders = 4
	stop := make(chan struct{})
	var wg sync.WaitGroup
	loadErr := make(chan error, loaders)
	started := make(chan struct{}, loaders)
	for i := 0; i < loaders; i++ {
		c, err := ctlDialFrom(inst.Addr, "127.0.0.1")
		require.NoError(t, err)
		defer c.Close()
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			buf := make([]byte, 64<<10)
			off := uint64(i) * (1 << 20)
			for n := 0; ; n++ {
				if n == 1 {
					started <- struct{}{}
				}
				select {
				case <-stop:
					return
				default:
				}
				ctx, cancel := context.WithTimeout(context.Background(), ctlTimeout)
				err := c.Write(ctx, buf, off+uint64(n%16)*uint64(len(buf)), 0)
				if err == nil {
					err = c.Read(ctx, buf, off, 0)
				}
				cancel()
				if err != nil {
					loadErr <- fmt.Errorf("loader %d: %w", i, err)
					return
				}
			}
		}(i)
	}
	for i := 0; i < loaders; i++ {
		<-started
	}

	const askers, rounds = 4, 20
	var cwg sync.WaitGroup
	for a := 0; a < askers; a++ {
		cwg.Add(1)
		go func(a int) {
			defer cwg.Done()
			for r := 0; r < rounds; r++ {
				var reply control.Reply
				var err error
				if a == 0 && r%5 == 0 {
					// Replacing the list with one that still admits the
					// loaders must not disturb them.
					reply, err = ctl.Do(context.Background(), control.CmdACL, "127.0.0.0/8", "::1")
				} else {
					reply, err = ctl.Do(context.Background(), control.CmdStatus)
				}
				if !assert.NoError(t, err) || !assert.True(t, reply.OK(), reply.String()) {
					return
				}
				if reply.Message != "updated" {
					fields, err := control.ParseFields(reply.Message)
					assert.NoError(t, err)
					assert.Contains(t, fields, control.Field{Key: "num_clients", Value: strconv.Itoa(loaders)})
				}
			}
		}(a)
	}
	cwg.Wait()
	close(stop)
	wg.Wait()
	close(loadErr)
	for err := range loadErr {
		require.NoError(t, err)
	}

	st := ctlStatus(t, ctl)
	written, err := strconv.ParseUint(st["bytes_written"], 10, 64)
	require.NoError(t, err)
	read, err := strconv.ParseUint(st["bytes_read"], 10, 64)
	require.NoError(t, err)
	require.Equal(t, inst.Server.Stats().BytesWritten, written)
	require.GreaterOrEqual(t, written, uint64(loaders*64<<10))
	require.GreaterOrEqual(t, read, uint64(loaders*64<<10))
	require.Equal(t, "0", st["errors"])
}
