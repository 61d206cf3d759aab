package main

import (
	"bytes"
	"errors"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/rs/zerolog"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
)

// cLine is the C flexnbd's log line: TIMESTAMP:LEVEL:PID THREAD
// SOURCE:LINE: MESSAGE.
var cLine = regexp.MustCompile(`^(\d+):([DIWEF]):(\d+) (0x[0-9a-f]+) ([\w./-]+\.go):(\d+): (.*)$`)

// Levels map to the C letters, fields follow the message as key=value in
// the order they were logged, and values with spaces are quoted so each
// stays one word.
func TestCLogLine(t *testing.T) {
	var buf bytes.Buffer
	log := zerolog.New(newCLogWriter(&buf)).Level(zerolog.DebugLevel).With().Caller().Str("component", "control").Logger()
	log.Debug().Msg("probe")
	log.Info().Uint64("size", 1<<20).Str("size_human", "1.0 MiB").Bool("oldstyle", false).Msg("serving")
	log.Warn().Err(errors.New("broken pipe")).Str("empty", "").Msg("client gone")
	log.Error().Float64("ratio", 0.5).Msg("request failed")

	lines := strings.Split(strings.TrimSuffix(buf.String(), "\n"), "\n")
	require.Len(t, lines, 4, buf.String())
	want := []struct{ level, msg string }{
		{"D", "probe component=control"},
		{"I", `serving component=control size=1048576 size_human="1.0 MiB" oldstyle=false`},
		{"W", `client gone component=control error="broken pipe" empty=""`},
		{"E", "request failed component=control ratio=0.5"},
	}
	for i, line := range lines {
		m := cLine.FindStringSubmatch(line)
		require.NotNil(t, m, "line %q", line)
		assert.Equal(t, want[i].level, m[2])
		assert.Equal(t, strconv.Itoa(os.Getpid()), m[3])
		assert.Equal(t, "flexnbd/clog_test.go", m[5], "the logging call's file")
		assert.Equal(t, want[i].msg, m[7])
	}
}

// Strings a client chose (an export name) are quoted when they hold
// control characters, message included: a CR or an escape sequence must
// not forge or repaint lines on the terminal that shows the log.
func TestCLogEscapesControlCharacters(t *testing.T) {
	var buf bytes.Buffer
	log := zerolog.New(newCLogWriter(&buf)).With().Caller().Logger()
	log.Info().Str("export", "vm1\r1:I:1 0x1 x.go:1: forged").Str("name", "\x1b[2Jx").
		Str("c1", "a\u009bb").Msg("unknown export\nforged")
	line := buf.String()
	require.True(t, strings.HasSuffix(line, "\n"))
	line = strings.TrimSuffix(line, "\n")
	for _, r := range line {
		require.False(t, r < 0x20 || r == 0x7f || r >= 0x80 && r <= 0x9f, "raw control %q in %q", r, line)
	}
	m := cLine.FindStringSubmatch(line)
	require.NotNil(t, m, line)
	assert.Equal(t, `"unknown export\nforged" export="vm1\r1:I:1 0x1 x.go:1: forged" name="\x1b[2Jx" c1="a\u009bb"`, m[7])
}

// A serve with --log-format c writes nothing but C lines, from its start
// to its stop.
func TestServeLogsInTheCFormat(t *testing.T) {
	p := testproc.Start(t, "", flexnbdBin, "serve", "-l", "127.0.0.1", "-p", "0", "-f", scratch(t, 1<<20, nil),
		"-v", "--log-format", "c")
	serving, ok := p.Stderr.Line(": serving listen=", p.Done(), testproc.Timeout)
	require.True(t, ok, "no serving line:\n%s", p.Stderr.Text())
	listen := regexp.MustCompile(`listen=(\S+)`).FindStringSubmatch(serving)[1]
	_, port, err := net.SplitHostPort(listen)
	require.NoError(t, err)
	out, errOut, code := testproc.Run(t, bytes.NewReader(make([]byte, 4096)), flexnbdBin,
		"write", "-l", "127.0.0.1", "-p", port, "-F", "0", "-S", "4K")
	require.Zero(t, code, out+errOut)
	p.Signal(t, syscall.SIGTERM)
	require.Zero(t, p.Wait(t))
	text := p.Stderr.Text()
	require.True(t, strings.HasSuffix(text, "\n"), "the log ends with a whole line")
	var messages []string
	handshakeSource := ""
	for _, line := range strings.Split(strings.TrimSuffix(text, "\n"), "\n") {
		m := cLine.FindStringSubmatch(line)
		require.NotNil(t, m, "line %q is not in the C format", line)
		assert.Equal(t, strconv.Itoa(p.Cmd.Process.Pid), m[3])
		messages = append(messages, m[7])
		if strings.HasPrefix(m[7], "handshake complete peer=127.0.0.1:") {
			handshakeSource = m[5]
		}
	}
	assert.Contains(t, messages[0], ` size=1048576 size_human="1.0 MiB" `)
	assert.True(t, strings.HasPrefix(handshakeSource, "server/"), "a client's events come from the server package: %q", handshakeSource)
	assert.Equal(t, "stopped", messages[len(messages)-1])
}
