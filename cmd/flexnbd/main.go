// Command flexnbd serves a file or block device over NBD, migrates it live
// to another host, and talks to running instances over a control socket.
package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"github.com/alecthomas/kong"
)

// cli lists the modes; each mode's Run wires packages together and returns
// an error for a one-line report and exit status 1.
type cli struct {
	Serve       ServeCmd       `cmd:"" help:"Serve a file or block device over NBD."`
	Listen      ListenCmd      `cmd:"" help:"Receive a migration, then exit or go on serving."`
	Mirror      MirrorCmd      `cmd:"" help:"Migrate a running server's export to a listening destination."`
	Read        ReadCmd        `cmd:"" help:"Read a range of an NBD export to standard output."`
	Write       WriteCmd       `cmd:"" help:"Write standard input to a range of an NBD export."`
	Status      StatusCmd      `cmd:"" help:"Print the status of a running flexnbd."`
	ACL         ACLCmd         `cmd:"" name:"acl" help:"Replace the access list of a running flexnbd."`
	Break       BreakCmd       `cmd:"" name:"break" help:"Abandon the migration of a running flexnbd."`
	MirrorSpeed MirrorSpeedCmd `cmd:"" name:"mirror-speed" help:"Change the speed limit of a running migration."`
	Proxy       ProxyCmd       `cmd:"" help:"Forward NBD clients to a server, reconnecting and replaying across its restarts."`
	Upstream    UpstreamCmd    `cmd:"" help:"Replace the upstream list of a running proxy."`
	Help        HelpCmd        `cmd:"" help:"Show help for flexnbd or one of its modes."`
	Version     VersionCmd     `cmd:"" help:"Print the version of flexnbd and of the Go it was built with."`
	Completion  CompletionCmd  `cmd:"" help:"Print a shell completion script (bash or zsh)."`

	VersionFlag kong.VersionFlag `name:"version" help:"Print the version and exit."`
}

// exitError carries an exit status other than 1.
type exitError struct {
	code int
	msg  string
}

func (e *exitError) Error() string { return e.msg }

func main() {
	args := os.Args[1:]
	// Installed as a link named flexnbd-proxy, it is the proxy mode.
	if filepath.Base(os.Args[0]) == "flexnbd-proxy" {
		args = append([]string{"proxy"}, args...)
		progName = "flexnbd-proxy"
	}
	os.Exit(run(cacheDefault(args)))
}

// cacheDefault gives a bare --cache of the proxy its default size, as the
// C flexnbd-proxy's --cache[=BYTES] does, and joins "--cache SIZE" into
// one word; kong has no optional values.
func cacheDefault(args []string) []string {
	if len(args) == 0 || args[0] != "proxy" {
		return args
	}
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return append(out, args[i:]...)
		}
		if a != "--cache" {
			out = append(out, a)
			continue
		}
		// "--cache 1M" is written too: a following word that is a
		// size is the value. The proxy takes no positional arguments
		// for it to steal.
		if i+1 < len(args) {
			if _, err := parseSize(args[i+1]); err == nil {
				out = append(out, "--cache="+args[i+1])
				i++
				continue
			}
		}
		out = append(out, "--cache="+strconv.Itoa(defaultProxyCache))
	}
	return out
}

// progName prefixes error messages: the name the user typed.
var progName = "flexnbd"

func run(args []string) int {
	var c cli
	parser, err := newParser(&c)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", progName, err)
		return 1
	}
	ctx, err := parser.Parse(args)
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", progName, err)
		return 1
	}
	if err := ctx.Run(parser); err != nil {
		var ee *exitError
		if errors.As(err, &ee) {
			if ee.msg != "" {
				fmt.Fprintln(os.Stderr, ee.msg)
			}
			return ee.code
		}
		fmt.Fprintf(os.Stderr, "%s: %v\n", progName, err)
		return 1
	}
	return 0
}

func newParser(c *cli) (*kong.Kong, error) {
	return kong.New(c,
		kong.Name("flexnbd"),
		kong.Description("A fast NBD server that can live-migrate its export."),
		kong.ConfigureHelp(kong.HelpOptions{Compact: true}),
		kong.Vars{"version": versionLine()},
		kong.NamedMapper("size", sizeMapper{}),
	)
}

// HelpCmd prints the help of flexnbd or of one mode.
type HelpCmd struct {
	Mode []string `arg:"" optional:"" help:"Mode to describe."`
}

// Run prints help through the parser's own --help, which exits 0.
func (h *HelpCmd) Run(parser *kong.Kong) error {
	args := append(append([]string{}, h.Mode...), "--help")
	var c cli
	p, err := newParser(&c)
	if err != nil {
		return err
	}
	_, err = p.Parse(args)
	return err
}
