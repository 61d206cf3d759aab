package main

import (
	"errors"
	"os"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// LogFlags are shared by every mode: -v for informational events, -q for
// fatal ones only, warnings by default, as the C flexnbd.
type LogFlags struct {
	Verbose   bool   `short:"v" help:"Log informational events too."`
	Quiet     bool   `short:"q" help:"Log only fatal errors."`
	LogFormat string `name:"log-format" enum:"console,json,c" default:"console" help:"Log as aligned text, one JSON object per line, or the C flexnbd's lines (${enum})."`
}

func (f *LogFlags) logger() zerolog.Logger {
	level := zerolog.WarnLevel
	switch {
	case f.Quiet:
		level = zerolog.FatalLevel
	case f.Verbose:
		level = zerolog.InfoLevel
	}
	zerolog.TimeFieldFormat = time.RFC3339Nano
	if f.LogFormat == "c" {
		return zerolog.New(newCLogWriter(os.Stderr)).Level(level).With().Caller().Logger()
	}
	var l zerolog.Logger
	if f.LogFormat == "json" {
		l = zerolog.New(os.Stderr)
	} else {
		l = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: "15:04:05.000", NoColor: true})
	}
	return l.Level(level).With().Timestamp().Logger()
}

// limitFlags bound what the clients of serve and listen may take.
type limitFlags struct {
	MaxMemory  int `name:"max-memory" type:"size" default:"1073741824" placeholder:"SIZE" help:"Data buffers (write payloads, read replies) of all clients together; beyond it clients wait."`
	MaxClients int `name:"max-clients" default:"4096" help:"Clients served at once; more are closed before any greeting."`
}

// check refuses limits that cannot work and fits the client limit to the
// descriptor limit.
func (f *limitFlags) check(log zerolog.Logger) error {
	if f.MaxClients < 1 {
		return errors.New("--max-clients must be at least 1")
	}
	if f.MaxMemory < 1<<20 {
		return errors.New("--max-memory must be at least 1 MiB (1048576)")
	}
	f.MaxClients = fitClients(f.MaxClients, log)
	return nil
}

// fdReserve is the file descriptors kept free of clients: the control
// socket's peers, the export, a migration's connections, logs.
const fdReserve = 64

// fitClients lowers a client limit that the process's descriptor limit
// could not honour, so that running out of descriptors never locks out the
// control socket or new clients for seconds at a time. (Go raises the soft
// limit to the hard one at start.)
func fitClients(limit int, log zerolog.Logger) int {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > uint64(limit+fdReserve) {
		return limit
	}
	fit := max(int(rl.Cur)-fdReserve, 1)
	log.Warn().Int("max_clients", limit).Uint64("nofile", rl.Cur).Int("now", fit).
		Msg("descriptor limit below max-clients; lowering it")
	return fit
}
