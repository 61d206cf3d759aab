package main

import (
	"os"
	"time"

	"github.com/rs/zerolog"
)

// LogFlags are shared by every mode: -v for informational events, -q for
// fatal ones only, warnings by default, as the C flexnbd.
type LogFlags struct {
	Verbose   bool   `short:"v" help:"Log informational events too."`
	Quiet     bool   `short:"q" help:"Log only fatal errors."`
	LogFormat string `name:"log-format" enum:"console,json" default:"console" help:"Log as aligned text or one JSON object per line (${enum})."`
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
	var l zerolog.Logger
	if f.LogFormat == "json" {
		l = zerolog.New(os.Stderr)
	} else {
		l = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: "15:04:05.000", NoColor: true})
	}
	return l.Level(level).With().Timestamp().Logger()
}
