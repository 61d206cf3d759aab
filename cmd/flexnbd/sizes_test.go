package main

import (
	"bytes"
	"os"
	"strconv"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
	}{
		{"0", 0},
		{"4096", 4096},
		{"18446744073709551615", 1<<64 - 1},
		{"512K", 512 << 10},
		{"512k", 512 << 10},
		{"100M", 100 << 20},
		{"1G", 1 << 30},
		{"2T", 2 << 40},
		{"1.5G", 3 << 29},
		{"1 G", 1 << 30},
		{"1GiB", 1 << 30},
		{"1gib", 1 << 30},
		{"1GB", 1_000_000_000},
		{"100MB", 100_000_000},
		{"64KiB", 64 << 10},
		{"10B", 10},
		{"0.5K", 512},
		{"1.25KiB", 1280},
		{"2.0", 2},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parseSize(tt.in)
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
		})
	}
	for _, bad := range []string{"", "G", "-1", "-1G", "1X", "lots", "1GG", "0x10",
		// humanize alone reads 1,5G as 15 GiB and rounds 1.9 down to 1.
		"1,5G", "1,000", "0.5", "1.9", "1.1K", "1.2.3K", "."} {
		t.Run("bad "+bad, func(t *testing.T) {
			_, err := parseSize(bad)
			assert.Error(t, err)
		})
	}
}

// read and write take --from and --size with units, and a bad size is one
// line and exit 1, as any bad flag.
func TestSizesOnTheCommandLine(t *testing.T) {
	path := scratch(t, 4<<20, nil)
	p := startServe(t, path, false, "--max-memory", "64M")
	addr := []string{"--addr", "127.0.0.1", "--port", strconv.Itoa(p.port)}
	data := randomData(64<<10, 7)
	w := runCLI(t, data, append([]string{"write", "--from", "1M", "--size", "64K"}, addr...)...)
	require.Zero(t, w.code, "%s", w.stderr)
	r := runCLI(t, nil, append([]string{"read", "--from", strconv.Itoa(1 << 20), "--size", "65536"}, addr...)...)
	require.Zero(t, r.code, "%s", r.stderr)
	assert.True(t, bytes.Equal(data, r.stdout), "1M and 64K are binary: 1048576 and 65536")
	r = runCLI(t, nil, append([]string{"read", "--from", "1MB", "--size", "64KiB"}, addr...)...)
	require.Zero(t, r.code, "%s", r.stderr)
	file, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.True(t, bytes.Equal(file[1_000_000:1_000_000+64<<10], r.stdout), "1MB is decimal, 64KiB binary")

	for _, args := range [][]string{
		append([]string{"read", "--from", "0", "--size", "1X"}, addr...),
		append([]string{"read", "--from", "lots", "--size", "1"}, addr...),
		append([]string{"read", "--from", "1,5M", "--size", "1"}, addr...),
		append([]string{"read", "--from", "0", "--size", "0.5"}, addr...),
		{"serve", "-l", "127.0.0.1", "-p", "0", "-f", path, "--max-memory", "1Q"},
		{"serve", "-l", "127.0.0.1", "-p", "0", "-f", path, "--max-memory", "512K"},
		{"proxy", "-l", "127.0.0.1", "-p", "1", "-C", "127.0.0.1", "-P", "1", "--cache", "64M"},
	} {
		res := runCLI(t, nil, args...)
		assert.Equal(t, 1, res.code, "%v", args)
		assert.Empty(t, res.stdout)
		requireOneLine(t, res.stderr)
	}
	assert.Zero(t, p.stop(t, syscall.SIGTERM))

	help := runCLI(t, nil, "read", "--help")
	assert.Contains(t, string(help.stdout), "--from=SIZE")
	assert.Contains(t, string(help.stdout), "--size=SIZE")
}
