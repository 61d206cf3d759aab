package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"unicode"

	"github.com/rs/zerolog"
	"golang.org/x/sys/unix"
)

// cLogWriter turns zerolog's JSON events into the C flexnbd's log lines,
//
//	TIMESTAMP:LEVEL:PID THREAD SOURCE:LINE: MESSAGE
//
// so that log parsers written for a C fleet keep working: TIMESTAMP is
// milliseconds of the monotonic clock, as the C tool prints it, LEVEL one
// of its letters (D I W E F), THREAD the constant cThread, SOURCE:LINE the
// logging call, and MESSAGE the event's message followed by its fields as
// key=value.
type cLogWriter struct {
	out io.Writer
	pid string
}

// cThread stands where the C tool prints its pthread's address: goroutines
// have no stable identity to print, and a parser expecting a pointer still
// finds one.
const cThread = "0x1"

func newCLogWriter(out io.Writer) *cLogWriter {
	return &cLogWriter{out: out, pid: strconv.Itoa(os.Getpid())}
}

// cLevels maps zerolog's levels to the C tool's letters, which has no
// trace or panic: they fold into the nearest.
var cLevels = map[string]byte{
	zerolog.LevelTraceValue: 'D',
	zerolog.LevelDebugValue: 'D',
	zerolog.LevelInfoValue:  'I',
	zerolog.LevelWarnValue:  'W',
	zerolog.LevelErrorValue: 'E',
	zerolog.LevelFatalValue: 'F',
	zerolog.LevelPanicValue: 'F',
}

// Write takes one event, as zerolog writes them, and writes one line in a
// single call, so that concurrent events do not interleave.
func (w *cLogWriter) Write(p []byte) (int, error) {
	fields, err := decodeEvent(p)
	if err != nil {
		return 0, fmt.Errorf("c log format: %w", err)
	}
	var level byte = 'I'
	var msg, caller string
	rest := fields[:0]
	for _, f := range fields {
		switch f.key {
		case zerolog.LevelFieldName:
			if l, ok := cLevels[f.value]; ok {
				level = l
			}
		case zerolog.MessageFieldName:
			msg = f.value
		case zerolog.CallerFieldName:
			caller = shortCaller(f.value)
		case zerolog.TimestampFieldName:
			// The monotonic clock replaces it, as in the C tool.
		default:
			rest = append(rest, f)
		}
	}
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts) // cannot fail for this clock
	line := make([]byte, 0, 128+len(p))
	line = strconv.AppendInt(line, ts.Nano()/1e6, 10)
	line = append(line, ':', level, ':')
	line = append(line, w.pid...)
	line = append(line, ' ')
	line = append(line, cThread...)
	line = append(line, ' ')
	line = append(line, caller...)
	line = append(line, ": "...)
	line = append(line, msg...)
	for _, f := range rest {
		line = append(line, ' ')
		line = append(line, f.key...)
		line = append(line, '=')
		line = append(line, f.value...)
	}
	line = append(line, '\n')
	if _, err := w.out.Write(line); err != nil {
		return 0, err
	}
	return len(p), nil
}

type eventField struct{ key, value string }

// decodeEvent lists an event's fields in the order they were logged.
// Strings lose their quotes unless they hold a space or are empty, so that
// each key=value stays one word; other values keep their JSON text.
func decodeEvent(p []byte) ([]eventField, error) {
	dec := json.NewDecoder(bytes.NewReader(p))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return nil, fmt.Errorf("event is not a JSON object")
	}
	var fields []eventField
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := t.(string) // object keys are strings
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, err
		}
		value := string(raw)
		var s string
		if len(raw) > 0 && raw[0] == '"' && json.Unmarshal(raw, &s) == nil {
			value = s
			// Clients supply some strings (export names): raw control
			// characters would let them forge lines on a terminal.
			if hasControl(s) || key != zerolog.MessageFieldName && (s == "" || strings.ContainsAny(s, " \"")) {
				value = strconv.Quote(s)
			}
		}
		fields = append(fields, eventField{key, value})
	}
	return fields, nil
}

// hasControl reports whether s holds a control character: C0, DEL or
// C1. (Bytes that are not UTF-8 arrive as U+FFFD: zerolog replaces them.)
func hasControl(s string) bool {
	return strings.IndexFunc(s, unicode.IsControl) >= 0
}

// shortCaller keeps the package directory and file of a caller, the part
// that names the source as the C tool's __FILE__ does (server/conn.go:88).
func shortCaller(c string) string {
	file, line, ok := strings.Cut(c, ":")
	if !ok {
		return c
	}
	dir, base := filepath.Split(file)
	return filepath.Join(filepath.Base(dir), base) + ":" + line
}
