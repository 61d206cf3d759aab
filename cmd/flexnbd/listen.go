package main

import (
	"github.com/dustin/go-humanize"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/server"
)

// ListenCmd is `flexnbd listen`: the destination of a migration.
type ListenCmd struct {
	File        string   `short:"f" required:"" help:"File or block device to receive into; it must exist and have the source's size."`
	Sock        string   `short:"s" help:"Control socket path."`
	DefaultDeny bool     `short:"d" name:"default-deny" help:"Refuse every client when the access list is empty."`
	Oldstyle    bool     `help:"Greet with the oldstyle handshake: for a C flexnbd source; the first connection is taken for the source."`
	ThenServe   bool     `name:"then-serve" help:"Once the migration completed, go on serving the file to every client instead of exiting."`
	ACL         []string `arg:"" optional:"" name:"acl" help:"Addresses or prefixes allowed to connect (the source included)."`
	listenFlags
	exportFlags
	limitFlags
	metricsFlags
	LogFlags
}

// Run receives a migration: it serves only the migration source until the
// source hands off, then syncs the file and exits 0, or goes on serving
// with --then-serve. A signal before that exits 1.
func (c *ListenCmd) Run() error {
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
	file, err := server.OpenFile(c.File, false)
	if err != nil {
		return err
	}
	defer file.Close()
	l, err := c.listen()
	if err != nil {
		return err
	}
	dest := &mirror.Destination{Oldstyle: c.Oldstyle, ThenServe: c.ThenServe, Logger: log}
	srv := server.New(server.Config{
		Backend:     file,
		ExportName:  c.ExportName,
		PolicyNames: []string{mirror.SourceExportName},
		Description: c.Description,
		Oldstyle:    c.Oldstyle,
		ACL:         list,
		Sessions:    dest,
		MaxClients:  c.MaxClients,
		MaxMemory:   c.MaxMemory,
		Metrics:     c.serverMetrics(),
		Logger:      log,
	})
	inst := newInstance(srv, file, c.File, dest, log)
	stopMetrics, err := startServing(inst, l, &c.listenFlags, &c.metricsFlags, c.ExportName)
	if err != nil {
		return err
	}
	defer stopMetrics()
	sigs := notifyStop()
	log.Info().Str("listen", l.Addr().String()).Str("file", c.File).Uint64("size", srv.Size()).
		Str("size_human", humanize.IBytes(srv.Size())).
		Bool("oldstyle", c.Oldstyle).Bool("then_serve", c.ThenServe).Func(c.logField).Msg("waiting for a migration")
	return runInstance(inst, l, c.Sock, c.ThenServe, sigs)
}
