package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
	"github.com/flexnbd/flexnbd/internal/testserver"
)

// unitCopy copies contrib/systemd's units into a directory of their own,
// with ExecStart pointing at the binary under test: systemd-analyze
// refuses a unit whose program does not exist, and nothing is installed
// under /usr/local/bin here. Nothing else is changed.
func unitCopy(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for _, name := range []string{"flexnbd@.service", "flexnbd@.socket"} {
		b, err := os.ReadFile(filepath.Join("..", "..", "contrib", "systemd", name))
		require.NoError(t, err)
		s := string(b)
		if strings.HasSuffix(name, ".service") {
			require.Contains(t, s, "ExecStart=/usr/bin/flexnbd serve ")
			s = strings.ReplaceAll(s, "/usr/bin/flexnbd", flexnbdBin)
		}
		require.NoError(t, os.WriteFile(filepath.Join(dir, name), []byte(s), 0o644))
	}
	return dir
}

// The units load without a single complaint from systemd's own checker,
// which works offline, without a running systemd. Warnings count: it
// exits 0 on a misspelt setting it merely ignores. The man page is not
// installed here, so its lookup is left out.
func TestSystemdUnitsVerify(t *testing.T) {
	analyze := testserver.Tool(t, "systemd-analyze")
	dir := unitCopy(t)
	stdout, stderr, code := testproc.Run(t, nil, analyze, "verify", "--man=no",
		filepath.Join(dir, "flexnbd@vm1.service"), filepath.Join(dir, "flexnbd@vm1.socket"))
	assert.Zero(t, code)
	assert.Empty(t, stdout)
	assert.Empty(t, stderr)
}

// The service's sandbox stays tight: systemd's exposure score (0 to 10)
// must stay at or under 2.0, where the unit as shipped is at 1.5.
func TestSystemdServiceHardening(t *testing.T) {
	analyze := testserver.Tool(t, "systemd-analyze")
	dir := unitCopy(t)
	stdout, stderr, code := testproc.Run(t, nil, analyze, "security", "--offline=yes", "--threshold=20",
		filepath.Join(dir, "flexnbd@vm1.service"))
	assert.Zero(t, code, "%s\n%s", stdout, stderr)
	assert.Empty(t, stderr)
}
