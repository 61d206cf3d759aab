package main

import (
	"context"
	"fmt"
	"os"
	"strconv"

	"github.com/flexnbd/flexnbd/control"
)

// controlFlags select the running instance to talk to.
type controlFlags struct {
	Sock string `short:"s" required:"" help:"Control socket of the running flexnbd."`
	// The C tool takes these on every mode; scripts pass them.
	Verbose bool `short:"v" hidden:"" help:"Accepted for compatibility; these modes log nothing."`
	Quiet   bool `short:"q" hidden:"" help:"Accepted for compatibility; these modes log nothing."`
}

// do holds one conversation. An unreachable socket or a garbled reply is
// an error (one line, exit 1); a reply is returned whatever its code.
func (f *controlFlags) do(command string, args ...string) (control.Reply, error) {
	c := control.Client{Path: f.Sock}
	return c.Do(context.Background(), command, args...)
}

// report prints the message as the C flexnbd's tools do: to standard
// output on code 0, to standard error with the code as exit status
// otherwise.
func report(r control.Reply) error {
	if r.OK() {
		fmt.Fprintln(os.Stdout, r.Message)
		return nil
	}
	return &exitError{code: r.Code, msg: r.Message}
}

// StatusCmd is `flexnbd status`.
type StatusCmd struct {
	controlFlags
	JSON bool `name:"json" help:"Print the status as one JSON object, numbers as numbers and booleans as booleans."`
}

// Run prints the status line, or its JSON form.
func (c *StatusCmd) Run() error {
	r, err := c.do(control.CmdStatus)
	if err != nil {
		return err
	}
	if !r.OK() || !c.JSON {
		return report(r)
	}
	fields, err := control.ParseFields(r.Message)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stdout, "%s\n", control.FieldsJSON(fields))
	return nil
}

// ACLCmd is `flexnbd acl`.
type ACLCmd struct {
	controlFlags
	ACL []string `arg:"" optional:"" name:"acl" help:"The new access list: addresses or prefixes allowed to connect; none admits everyone unless the server runs with --default-deny."`
}

// Run replaces the running server's access list.
func (c *ACLCmd) Run() error {
	r, err := c.do(control.CmdACL, c.ACL...)
	if err != nil {
		return err
	}
	return report(r)
}

// BreakCmd is `flexnbd break`.
type BreakCmd struct {
	controlFlags
}

// Run abandons the running migration.
func (c *BreakCmd) Run() error {
	r, err := c.do(control.CmdBreak)
	if err != nil {
		return err
	}
	return report(r)
}

// MirrorSpeedCmd is `flexnbd mirror-speed`.
type MirrorSpeedCmd struct {
	controlFlags
	// A string, so that the server judges what is not a size and words
	// the error as the C flexnbd does.
	MaxSpeed string `short:"m" name:"max-speed" required:"" placeholder:"BYTES_PER_SEC" help:"New speed limit of the running migration, in bytes per second, 100M for example."`
}

// Run changes the running migration's speed limit.
func (c *MirrorSpeedCmd) Run() error {
	speed := c.MaxSpeed
	if n, err := parseSize(speed); err == nil {
		speed = strconv.FormatUint(n, 10)
	}
	r, err := c.do(control.CmdMirrorMaxBps, speed)
	if err != nil {
		return err
	}
	return report(r)
}

// UpstreamCmd is `flexnbd upstream`.
type UpstreamCmd struct {
	controlFlags
	Upstreams []string `arg:"" name:"upstream" help:"The proxy's new upstreams, host:port or a Unix socket path, tried in this order at its next reconnection."`
}

// Run replaces a running proxy's upstream list.
func (c *UpstreamCmd) Run() error {
	r, err := c.do(control.CmdUpstream, c.Upstreams...)
	if err != nil {
		return err
	}
	return report(r)
}
