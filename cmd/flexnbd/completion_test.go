package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// completionScript writes the script flexnbd prints for shell.
func completionScript(t *testing.T, shell string) string {
	t.Helper()
	res := runCLI(t, nil, "completion", shell)
	require.Zero(t, res.code, "%s", res.stderr)
	require.Empty(t, res.stderr)
	path := filepath.Join(t.TempDir(), "flexnbd."+shell)
	require.NoError(t, os.WriteFile(path, res.stdout, 0o644))
	return path
}

// The bash script loads, registers itself for both names, and completes
// modes, flags and flag values as bash's completion machinery calls it.
func TestBashCompletion(t *testing.T) {
	script := completionScript(t, "bash")
	out, err := exec.Command("bash", "-n", script).CombinedOutput()
	require.NoError(t, err, "bash -n: %s", out)

	// complete asks the function with the words so far; print what it
	// offers, one per line.
	complete := func(words ...string) []string {
		t.Helper()
		quoted := make([]string, len(words))
		for i, w := range words {
			quoted[i] = shellQuote(w)
		}
		prog := `source "$1" && COMP_WORDS=(` + strings.Join(quoted, " ") + `) && COMP_CWORD=$((${#COMP_WORDS[@]} - 1)) ` +
			`&& _flexnbd && printf '%s\n' "${COMPREPLY[@]}"`
		out, err := exec.Command("bash", "-c", prog, "bash", script).CombinedOutput()
		require.NoError(t, err, "%s", out)
		return strings.Fields(string(out))
	}
	assert.Equal(t, []string{"serve"}, complete("flexnbd", "se"))
	assert.ElementsMatch(t, []string{"mirror", "mirror-speed"}, complete("flexnbd", "mir"))
	assert.Equal(t, []string{"--log-format"}, complete("flexnbd", "serve", "--log-f"))
	assert.Equal(t, []string{"console", "json", "c"}, complete("flexnbd", "serve", "--log-format", ""))
	assert.Equal(t, []string{"--max-speed"}, complete("flexnbd", "mirror", "--max-s"))
	assert.Equal(t, []string{"bash", "zsh"}, complete("flexnbd", "completion", ""))
	assert.Equal(t, []string{"--cache"}, complete("flexnbd-proxy", "--cac"), "flexnbd-proxy is the proxy mode")
	assert.Empty(t, complete("flexnbd", "serve", "--port", ""), "nothing to offer for a port")

	out, err = exec.Command("bash", "-c", `source "$1" && complete -p flexnbd flexnbd-proxy`, "bash", script).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, "complete -F _flexnbd flexnbd\ncomplete -F _flexnbd flexnbd-proxy\n", string(out))
}

// The zsh script parses and offers every mode and flag; CI installs zsh,
// so a missing one fails rather than skips.
func TestZshCompletion(t *testing.T) {
	script := completionScript(t, "zsh")
	zsh, err := exec.LookPath("zsh")
	require.NoError(t, err, "zsh is needed (.ci/run installs it)")
	out, err := exec.Command(zsh, "-n", script).CombinedOutput()
	require.NoError(t, err, "zsh -n: %s", out)
	text, err := os.ReadFile(script)
	require.NoError(t, err)
	assert.True(t, strings.HasPrefix(string(text), "#compdef flexnbd flexnbd-proxy\n"))
	for _, want := range []string{"'serve:Serve a file", "'mirror-speed:", "_flexnbd_mirror_speed() {",
		"--log-format[", ":log-format:(console json c)", "{-f,--file}", ":file:_files", "'*:shell:(bash zsh)'"} {
		assert.Contains(t, string(text), want)
	}

	// Loaded into an interactive-less zsh with the completion system, the
	// functions are defined and registered for both names.
	prog := `autoload -Uz compinit && compinit -u -d "$2/zcompdump" && source "$1" && ` +
		`print -r -- $_comps[flexnbd] $_comps[flexnbd-proxy] && whence -w _flexnbd_serve`
	out, err = exec.Command(zsh, "-f", "-c", prog, "zsh", script, t.TempDir()).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Equal(t, "_flexnbd _flexnbd\n_flexnbd_serve: function\n", string(out))
}
