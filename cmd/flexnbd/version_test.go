package main

import (
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
)

// A version set at build time, as the Makefile sets it, is what --version,
// the version mode and the status of a running serve report.
func TestVersionSetAtBuildTime(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "flexnbd")
	out, err := exec.Command("go", "build", "-o", bin, "-ldflags", "-X main.version=v9.8.7-3-gabcdef",
		"github.com/flexnbd/flexnbd/cmd/flexnbd").CombinedOutput()
	require.NoError(t, err, "%s", out)
	want := "flexnbd v9.8.7-3-gabcdef " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH + "\n"
	for _, args := range [][]string{{"--version"}, {"version"}} {
		stdout, stderr, code := testproc.Run(t, nil, bin, args...)
		assert.Zero(t, code, stderr)
		assert.Empty(t, stderr)
		assert.Equal(t, want, stdout, "flexnbd %s", strings.Join(args, " "))
	}

	sock := filepath.Join(t.TempDir(), "ctl.sock")
	p := testproc.Start(t, "", bin, "serve", "-l", "127.0.0.1", "-p", "0", "-f", scratch(t, 1<<20, nil), "-s", sock, "-v")
	p.Stderr.WaitFor(t, "control socket ready")
	stdout, stderr, code := testproc.Run(t, nil, bin, "status", "-s", sock)
	require.Zero(t, code, stderr)
	assert.Regexp(t, `^pid=\d+ size=1048576 .* connections_rejected=\d+ version=v9\.8\.7-3-gabcdef \n$`, stdout)
	stdout, stderr, code = testproc.Run(t, nil, bin, "status", "-s", sock, "--json")
	require.Zero(t, code, stderr)
	assert.Regexp(t, `,"version":"v9\.8\.7-3-gabcdef"}\n$`, stdout)
	p.Signal(t, 15)
	assert.Zero(t, p.Wait(t))
}

// Without a version set at build time, the binary still names one (the
// module version, the commit, or devel) and status reports the same.
func TestVersionFromBuildInfo(t *testing.T) {
	stdout, stderr, code := testproc.Run(t, nil, flexnbdBin, "version")
	require.Zero(t, code, stderr)
	m := regexp.MustCompile(`^flexnbd (\S+) go\S+ \S+/\S+\n$`).FindStringSubmatch(stdout)
	require.NotNil(t, m, "version line %q", stdout)

	sock := filepath.Join(t.TempDir(), "ctl.sock")
	p := ctlStartServe(t, sock)
	st := ctlRun(t, "status", "-s", sock)
	require.Zero(t, st.code, st.stderr)
	assert.True(t, strings.HasSuffix(st.stdout, " version="+m[1]+" \n"), "status %q", st.stdout)
	assert.Zero(t, p.stop(t))
}
