package main

import (
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
	"github.com/flexnbd/flexnbd/internal/testserver"
)

// --cache takes its size as --cache=SIZE or --cache SIZE, as the issue
// and the C flexnbd-proxy's users write it; alone, before another flag or
// at the end, it is the 64 KiB default. Which size is in force shows in
// the read-ahead hits of two consecutive reads on one connection: a read
// of at most half the cache is fetched twice over.
func TestProxyCacheForms(t *testing.T) {
	up := startServe(t, scratch(t, 4<<20, randomData(4<<20, 5)), false)
	qemuIO := testserver.Tool(t, "qemu-io")
	tests := []struct {
		name  string
		cache []string // the --cache words, placed before -v
		last  bool     // put them last instead
		read  string   // qemu-io's read length
		hits  bool
	}{
		{"separate value", []string{"--cache", "1M"}, false, "256k", true},
		{"equals value", []string{"--cache=1M"}, false, "256k", true},
		{"bare before a flag: too small for 256k", []string{"--cache"}, false, "256k", false},
		{"bare before a flag", []string{"--cache"}, false, "16k", true},
		{"bare at the end", []string{"--cache"}, true, "16k", true},
		{"off", nil, false, "16k", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "ctl.sock")
			args := []string{"proxy", "-l", "127.0.0.1", "-p", "0", "--print-uri", "-C", "127.0.0.1",
				"-P", strconv.Itoa(up.port), "-s", sock}
			if tt.last {
				args = append(append(args, "-v"), tt.cache...)
			} else {
				args = append(append(args, tt.cache...), "-v")
			}
			p := testproc.Start(t, "", flexnbdBin, args...)
			uri := printedURI(t, p)
			_, stderr, code := testproc.Run(t, nil, qemuIO, "-f", "raw", "-r",
				"-c", "read 0 "+tt.read, "-c", "read "+tt.read+" "+tt.read, uri)
			require.Zero(t, code, stderr)
			st := ctlRun(t, "status", "-s", sock)
			require.Zero(t, st.code, st.stderr)
			m := regexp.MustCompile(`cache_hits=(\d+)`).FindStringSubmatch(st.stdout)
			require.NotNil(t, m, st.stdout)
			assert.Equal(t, tt.hits, m[1] != "0", st.stdout)
			p.Signal(t, syscall.SIGTERM)
			assert.Zero(t, p.Wait(t))
		})
	}
	assert.Zero(t, up.stop(t, syscall.SIGTERM))
}
