package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/server"
)

// ServeCmd is `flexnbd serve`, with the C flexnbd's flags.
type ServeCmd struct {
	File        string   `short:"f" required:"" help:"File or block device to serve; it must exist."`
	Sock        string   `short:"s" help:"Control socket path."`
	DefaultDeny bool     `short:"d" name:"default-deny" help:"Refuse every client when the access list is empty."`
	KillSwitch  bool     `short:"k" name:"killswitch" help:"Disconnect a client whose request takes over 120 s."`
	ReadOnly    bool     `name:"read-only" help:"Refuse writes."`
	Oldstyle    bool     `help:"Greet clients with the oldstyle handshake (C flexnbd fleets)."`
	ACL         []string `arg:"" optional:"" name:"acl" help:"Addresses or prefixes allowed to connect."`
	listenFlags
	exportFlags
	limitFlags
	metricsFlags
	LogFlags
}

// notifyStop catches the signals that stop an instance.
func notifyStop() chan os.Signal {
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGQUIT)
	return sigs
}

// shutdownGrace bounds how long in-flight requests may take to finish
// once a signal asked the server to stop.
const shutdownGrace = 30 * time.Second

// controlGrace bounds how long control conversations in progress may
// delay a shutdown.
const controlGrace = 2 * time.Second

// Run serves until SIGINT, SIGTERM or SIGQUIT, or until a migration handed
// the export over, then finishes in-flight requests, syncs the file and
// returns.
func (c *ServeCmd) Run() error {
	log := c.logger()
	list, err := acl.New(c.ACL, c.DefaultDeny)
	if err != nil {
		return err
	}
	if err := c.limitFlags.check(log); err != nil {
		return err
	}
	if err := c.exportFlags.check(); err != nil {
		return err
	}
	file, err := server.OpenFile(c.File, c.ReadOnly)
	if err != nil {
		return err
	}
	defer file.Close()
	l, err := c.listen()
	if err != nil {
		return err
	}
	srv := server.New(server.Config{
		Backend:     file,
		ExportName:  c.ExportName,
		PolicyNames: []string{mirror.SourceExportName},
		Description: c.Description,
		ReadOnly:    c.ReadOnly,
		Oldstyle:    c.Oldstyle,
		ACL:         list,
		KillSwitch: func() time.Duration {
			if c.KillSwitch {
				return 120 * time.Second
			}
			return 0
		}(),
		Sessions:   mirror.Source{},
		MaxClients: c.MaxClients,
		MaxMemory:  c.MaxMemory,
		Metrics:    c.serverMetrics(),
		Logger:     log,
	})
	inst := newInstance(srv, file, c.File, nil, log)
	stopMetrics, err := startServing(inst, l, &c.listenFlags, &c.metricsFlags, c.ExportName)
	if err != nil {
		return err
	}
	defer stopMetrics()
	// Signals are caught before "serving" is logged: a script that
	// stops the server once it reads that line must get a clean stop.
	sigs := notifyStop()
	log.Info().Str("listen", l.Addr().String()).Str("file", c.File).Uint64("size", srv.Size()).
		Str("size_human", humanize.IBytes(srv.Size())).
		Bool("oldstyle", c.Oldstyle).Bool("read_only", c.ReadOnly).Func(c.logField).Msg("serving")
	return runInstance(inst, l, c.Sock, false, sigs)
}

// startServing wires what serve and listen share once their instance
// exists: the URI printed when it is ready, and the metrics endpoint. On
// failure it closes l, which removes a Unix socket file.
func startServing(inst *instance, l net.Listener, lf *listenFlags, mf *metricsFlags, exportName string) (stop func(), err error) {
	inst.onReady = func() { lf.printURI(l, exportName) }
	if stop, err = mf.serveInstance(inst); err != nil {
		l.Close()
		return nil, err
	}
	return stop, nil
}

// errStoppedMidMigration is the exit of a server stopped while it was
// migrating its export, or still receiving it: the other side holds no
// complete copy.
var errStoppedMidMigration = errors.New("stopped during a migration")

// runInstance serves inst on l, with its control socket at sock, until a
// signal, a hand-off or a failure ends it. A listen instance that
// completes its migration exits then, or with thenServe goes on serving.
func runInstance(inst *instance, l net.Listener, sock string, thenServe bool, sigs chan os.Signal) error {
	log, srv := inst.log, inst.srv
	inst.self = l.Addr()
	defer signal.Stop(sigs)
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(l) }()

	// The control socket appears only now that the NBD port listens:
	// scripts wait for the file and then expect to connect.
	ctl, ctlErr, err := startControl(sock, inst, log)
	if err != nil {
		srv.Close()
		<-serveErr
		return err
	}
	defer ctl.Close() // removes the socket file on every way out
	if inst.onReady != nil {
		inst.onReady()
	}
	notifyReady(log)
	defer watchStatus(inst)()

	var complete <-chan struct{}
	if inst.dest != nil {
		complete = inst.dest.Complete()
	}
	for {
		select {
		case sig := <-sigs:
			log.Info().Str("signal", sig.String()).Msg("shutting down")
			notifyStopping(log)
			midMigration := inst.stopMirror() || !inst.hasControl()
			if err := shutdown(inst, ctl, serveErr); err != nil {
				return err
			}
			if midMigration {
				return errStoppedMidMigration
			}
			return nil
		case err := <-serveErr:
			inst.stopMirror()
			return fmt.Errorf("serve: %w", err)
		case err := <-ctlErr:
			inst.stopMirror()
			srv.Close()
			<-serveErr
			return fmt.Errorf("control socket: %w", err)
		case <-complete:
			complete = nil
			if err := inst.file.Sync(); err != nil {
				return fmt.Errorf("sync after the migration: %w", err)
			}
			if !thenServe {
				log.Info().Msg("migration received; exiting")
				notifyStopping(log)
				return shutdown(inst, ctl, serveErr)
			}
			log.Info().Msg("migration received; serving")
		case <-inst.handedOff:
			// The held requests were dropped unexecuted; everything
			// else closes now, without a drain that could run more.
			log.Info().Msg("export handed off; exiting")
			notifyStopping(log)
			srv.Close()
			<-serveErr
			ctlShutdown(ctl, log)
			markHandedOff(log)
			return nil
		}
	}
}

// shutdown stops control first, so the socket file is gone by the time
// the NBD port closes, then lets the server finish its requests.
func shutdown(inst *instance, ctl *control.Server, serveErr <-chan error) error {
	ctlShutdown(ctl, inst.log)
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := inst.srv.Shutdown(ctx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := <-serveErr; !errors.Is(err, server.ErrServerClosed) {
		return err
	}
	inst.log.Info().Msg("stopped")
	return nil
}

// ctlShutdown lets control conversations in progress finish for a short
// while (a mirror_wait gets its answer), then cuts them.
func ctlShutdown(ctl *control.Server, log zerolog.Logger) {
	ctx, cancel := context.WithTimeout(context.Background(), controlGrace)
	defer cancel()
	if err := ctl.Shutdown(ctx); err != nil {
		log.Warn().Err(err).Msg("control conversations cut short")
	}
}

// startControl serves the control socket at path, if one was asked for.
// Without one it returns a Server that serves nothing and a channel that
// never delivers, so the caller need not tell the cases apart.
func startControl(path string, h control.Handler, log zerolog.Logger) (*control.Server, <-chan error, error) {
	ctl := &control.Server{Handler: h, Logger: log.With().Str("component", "control").Logger()}
	errs := make(chan error, 1)
	if path == "" {
		return ctl, errs, nil
	}
	cl, err := control.Listen(path)
	if err != nil {
		return nil, nil, err
	}
	log.Info().Str("sock", path).Msg("control socket ready")
	go func() {
		if err := ctl.Serve(cl); !errors.Is(err, control.ErrServerClosed) {
			errs <- err
		}
	}()
	return ctl, errs, nil
}
