package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/server"
)

// ServeCmd is `flexnbd serve`, with the C flexnbd's flags.
type ServeCmd struct {
	Addr        string   `short:"l" required:"" help:"Address to listen on."`
	Port        uint16   `short:"p" required:"" help:"TCP port to listen on."`
	File        string   `short:"f" required:"" help:"File or block device to serve; it must exist."`
	Sock        string   `short:"s" help:"Control socket path."`
	DefaultDeny bool     `short:"d" name:"default-deny" help:"Refuse every client when the access list is empty."`
	KillSwitch  bool     `short:"k" name:"killswitch" help:"Disconnect a client whose request takes over 120 s."`
	ReadOnly    bool     `name:"read-only" help:"Refuse writes."`
	Oldstyle    bool     `help:"Greet clients with the oldstyle handshake (C flexnbd fleets)."`
	ACL         []string `arg:"" optional:"" name:"acl" help:"Addresses or prefixes allowed to connect."`
	LogFlags
}

// shutdownGrace bounds how long in-flight requests may take to finish
// once a signal asked the server to stop.
const shutdownGrace = 30 * time.Second

// Run serves until SIGINT, SIGTERM or SIGQUIT, then finishes in-flight
// requests, syncs the file and returns.
func (c *ServeCmd) Run() error {
	log := c.logger()
	list, err := acl.New(c.ACL, c.DefaultDeny)
	if err != nil {
		return err
	}
	file, err := server.OpenFile(c.File, c.ReadOnly)
	if err != nil {
		return err
	}
	defer file.Close()

	l, err := net.Listen("tcp", net.JoinHostPort(c.Addr, strconv.Itoa(int(c.Port))))
	if err != nil {
		return err
	}
	srv := server.New(server.Config{
		Backend:  file,
		ReadOnly: c.ReadOnly,
		Oldstyle: c.Oldstyle,
		ACL:      list,
		KillSwitch: func() time.Duration {
			if c.KillSwitch {
				return 120 * time.Second
			}
			return 0
		}(),
		Logger: log,
	})
	log.Info().Str("listen", l.Addr().String()).Str("file", c.File).Uint64("size", srv.Size()).
		Bool("oldstyle", c.Oldstyle).Bool("read_only", c.ReadOnly).Msg("serving")

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT)
	defer signal.Stop(sigs)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()

	select {
	case sig := <-sigs:
		log.Info().Str("signal", sig.String()).Msg("shutting down")
	case err := <-serveErr:
		return fmt.Errorf("serve: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := <-serveErr; !errors.Is(err, server.ErrServerClosed) {
		return err
	}
	log.Info().Msg("stopped")
	return nil
}
