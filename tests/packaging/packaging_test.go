package packaging

import (
	"debug/elf"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
)

// root is the repository, where the Makefile is.
var root, _ = filepath.Abs("../..")

// make runs a target of the Makefile with variables and fails the test
// with make's output if it fails.
func runMake(t *testing.T, args ...string) {
	t.Helper()
	start := time.Now()
	out, err := exec.Command("make", append([]string{"-C", root, "--no-print-directory"}, args...)...).CombinedOutput()
	require.NoError(t, err, "make %s:\n%s", strings.Join(args, " "), out)
	t.Logf("make %s took %v", args[0], time.Since(start).Round(time.Second))
}

// installed lists the paths under dir that are not directories, relative
// to dir, sorted.
func installed(t *testing.T, dir string) []string {
	t.Helper()
	var paths []string
	err := filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		paths = append(paths, "/"+rel)
		return err
	})
	require.NoError(t, err)
	slices.Sort(paths)
	return paths
}

// expected is what an install puts under prefix: the binary and its
// proxy name, every man page, the completions and every systemd unit of
// contrib/systemd.
func expected(t *testing.T, prefix, zshDir string) []string {
	t.Helper()
	paths := []string{
		prefix + "/bin/flexnbd",
		prefix + "/bin/flexnbd-proxy",
		prefix + "/share/bash-completion/completions/flexnbd",
		prefix + "/share/bash-completion/completions/flexnbd-proxy",
		zshDir + "/_flexnbd",
	}
	paths = append(paths, prefix+"/lib/sysusers.d/flexnbd.conf", prefix+"/share/doc/flexnbd/example.conf")
	for _, pattern := range []string{"man/*.1", "contrib/systemd/*.service", "contrib/systemd/*.socket"} {
		files, err := filepath.Glob(filepath.Join(root, pattern))
		require.NoError(t, err)
		if pattern == "man/*.1" {
			require.NotEmpty(t, files, "man pages")
		}
		for _, f := range files {
			dir := prefix + "/share/man/man1/"
			if strings.HasPrefix(pattern, "contrib") {
				dir = prefix + "/lib/systemd/system/"
			}
			paths = append(paths, dir+filepath.Base(f))
		}
	}
	slices.Sort(paths)
	return paths
}

// The binary follows VERSION: a new tag, or make VERSION=..., rebuilds it
// even though no Go file changed.
func TestVersionChangeRebuilds(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "flexnbd")
	for _, v := range []string{"v1.0.0-first", "v1.0.0-second", "v1.0.0-first"} {
		runMake(t, "build", "BIN="+bin, "VERSION="+v)
		stdout, stderr, code := testproc.Run(t, nil, bin, "--version")
		require.Zero(t, code, stderr)
		assert.True(t, strings.HasPrefix(stdout, "flexnbd "+v+" "), "built at %s: %q", v, stdout)
	}
}

func TestMakeInstallAndUninstall(t *testing.T) {
	dest := t.TempDir()
	vars := []string{"DESTDIR=" + dest, "PREFIX=/usr/local", "BIN=" + filepath.Join(t.TempDir(), "flexnbd"),
		"VERSION=v1.2.3-test"}
	runMake(t, append([]string{"install"}, vars...)...)
	require.Equal(t, expected(t, "/usr/local", "/usr/local/share/zsh/site-functions"), installed(t, dest))

	bin := filepath.Join(dest, "usr/local/bin/flexnbd")
	stdout, stderr, code := testproc.Run(t, nil, bin, "--version")
	require.Zero(t, code, stderr)
	assert.True(t, strings.HasPrefix(stdout, "flexnbd v1.2.3-test go"), "the version reaches the binary: %q", stdout)
	link, err := os.Readlink(filepath.Join(dest, "usr/local/bin/flexnbd-proxy"))
	require.NoError(t, err)
	assert.Equal(t, "flexnbd", link, "a relative link, valid wherever DESTDIR is copied")
	script, _, code := testproc.Run(t, nil, bin, "completion", "bash")
	require.Zero(t, code)
	got, err := os.ReadFile(filepath.Join(dest, "usr/local/share/bash-completion/completions/flexnbd"))
	require.NoError(t, err)
	assert.Equal(t, script, string(got))
	units, err := filepath.Glob(filepath.Join(root, "contrib/systemd/flexnbd@.*"))
	require.NoError(t, err)
	require.Len(t, units, 2, "the service and the socket")
	for _, u := range units {
		src, err := os.ReadFile(u)
		require.NoError(t, err)
		got, err := os.ReadFile(filepath.Join(dest, "usr/local/lib/systemd/system", filepath.Base(u)))
		require.NoError(t, err)
		assert.Equal(t, strings.ReplaceAll(string(src), "/usr/bin/flexnbd", "/usr/local/bin/flexnbd"), string(got),
			"the unit runs the installed binary")
	}

	runMake(t, append([]string{"uninstall"}, vars...)...)
	assert.Empty(t, installed(t, dest), "uninstall removes everything install put")
}

// The package holds what install puts under /usr, a binary that needs no
// library, and installs and removes cleanly.
func TestDebPackage(t *testing.T) {
	for _, tool := range []string{"dpkg", "dpkg-deb"} {
		_, err := exec.LookPath(tool)
		require.NoError(t, err, "%s is needed", tool)
	}
	out := t.TempDir()
	build := t.TempDir()
	// A binary a build at another version left where make deb stages
	// its own must not be what it packages.
	runMake(t, "build", "BIN="+filepath.Join(build, "deb-bin", "flexnbd"), "VERSION=v0.0.1-stale")
	runMake(t, "deb", "DEBDIR="+out, "DEBBUILD="+build, "VERSION=v1.2.3-4-gabcdef0")
	deb := filepath.Join(out, "flexnbd_1.2.3+4+gabcdef0_"+runtime.GOARCH+".deb")
	require.FileExists(t, deb)

	fields, err := exec.Command("dpkg-deb", "--field", deb, "Package", "Version", "Architecture").CombinedOutput()
	require.NoError(t, err, "%s", fields)
	assert.Equal(t, "Package: flexnbd\nVersion: 1.2.3+4+gabcdef0\nArchitecture: "+runtime.GOARCH+"\n", string(fields))
	info, err := exec.Command("dpkg-deb", "--info", deb).CombinedOutput()
	require.NoError(t, err, "%s", info)
	assert.NotRegexp(t, `(?m)^\s+\d+ bytes,\s+\d+ lines\s+\*?\s*(preinst|postinst|prerm|postrm)\b`, string(info),
		"no maintainer scripts")
	assert.NotContains(t, string(info), "Depends:")

	contents, err := exec.Command("dpkg-deb", "--contents", deb).CombinedOutput()
	require.NoError(t, err, "%s", contents)
	var listed []string
	for _, line := range strings.Split(strings.TrimSpace(string(contents)), "\n") {
		f := strings.Fields(line)
		require.GreaterOrEqual(t, len(f), 6, "line %q", line)
		if !strings.HasPrefix(f[0], "d") {
			listed = append(listed, strings.TrimPrefix(f[5], "."))
		}
	}
	slices.Sort(listed)
	want := expected(t, "/usr", "/usr/share/zsh/vendor-completions")
	require.Equal(t, want, listed)

	// dpkg in a root of its own: an empty database, nothing of the host's.
	sysroot := t.TempDir()
	admin := filepath.Join(sysroot, "var/lib/dpkg")
	for _, d := range []string{"info", "updates"} {
		require.NoError(t, os.MkdirAll(filepath.Join(admin, d), 0o755))
	}
	for _, f := range []string{"status", "available"} {
		require.NoError(t, os.WriteFile(filepath.Join(admin, f), nil, 0o644))
	}
	dpkg := func(args ...string) {
		t.Helper()
		out, err := exec.Command("dpkg", append([]string{"--root=" + sysroot}, args...)...).CombinedOutput()
		require.NoError(t, err, "dpkg %s:\n%s", strings.Join(args, " "), out)
	}
	dpkg("--install", deb)
	outside := func() []string {
		var paths []string
		for _, p := range installed(t, sysroot) {
			if !strings.HasPrefix(p, "/var/lib/dpkg/") {
				paths = append(paths, p)
			}
		}
		return paths
	}
	require.Equal(t, want, outside())
	bin := filepath.Join(sysroot, "usr/bin/flexnbd")
	stdout, stderr, code := testproc.Run(t, nil, bin, "version")
	require.Zero(t, code, stderr)
	assert.True(t, strings.HasPrefix(stdout, "flexnbd v1.2.3-4-gabcdef0 "), stdout)
	exe, err := elf.Open(bin)
	require.NoError(t, err)
	defer exe.Close()
	for _, p := range exe.Progs {
		assert.NotEqual(t, elf.PT_INTERP, p.Type, "a static binary: the package depends on nothing")
	}

	dpkg("--remove", "flexnbd")
	assert.Empty(t, outside(), "removal leaves none of the package's files")
}
