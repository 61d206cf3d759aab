package main

import (
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
)

// version is set at build time by the Makefile:
//
//	go build -ldflags "-X main.version=$(git describe --tags --always --dirty)"
//
// A plain go build or go install leaves it empty; buildVersion then falls
// back to what the toolchain recorded.
var version string

// buildVersion is this binary's version: the one set at build time, else
// the module version of a `go install module@version`, else the commit it
// was built from (with -dirty for uncommitted changes), else "devel".
func buildVersion() string {
	if version != "" {
		return version
	}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	if v := info.Main.Version; v != "" && v != "(devel)" {
		return v
	}
	var revision string
	var dirty bool
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			revision = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if revision == "" {
		return "devel"
	}
	if len(revision) > 12 {
		revision = revision[:12]
	}
	if dirty {
		revision += "-dirty"
	}
	return revision
}

// versionLine is what --version and the version mode print: the program,
// its version and the Go release and platform it was built with, separated
// by single spaces so that scripts can split it.
func versionLine() string {
	return "flexnbd " + buildVersion() + " " + runtime.Version() + " " + runtime.GOOS + "/" + runtime.GOARCH
}

// VersionCmd is `flexnbd version`.
type VersionCmd struct{}

// Run prints the version line.
func (VersionCmd) Run() error {
	_, err := fmt.Fprintln(os.Stdout, versionLine())
	return err
}
