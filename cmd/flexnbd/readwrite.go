package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"github.com/flexnbd/flexnbd/nbd"
)

// maxTransfer bounds the size of one read or write invocation.
const maxTransfer = 1 << 30

// remoteFlags select the export and range of read and write.
type remoteFlags struct {
	URI  string `arg:"" optional:"" name:"uri" help:"The export as an NBD URI (nbd://host[:port][/export], nbd+unix:///export?socket=PATH), in place of --addr and --port."`
	Addr string `short:"l" help:"Server address."`
	Port uint16 `short:"p" help:"Server port."`
	From uint64 `short:"F" type:"size" required:"" placeholder:"SIZE" help:"Offset of the first byte."`
	Size uint64 `short:"S" type:"size" required:"" placeholder:"SIZE" help:"Number of bytes (at most 1 GiB)."`
	Bind string `short:"b" help:"Local address to connect from."`
	LogFlags
}

// dial connects and negotiates, checking the range against the export.
func (f *remoteFlags) dial(ctx context.Context) (*nbd.Client, error) {
	if f.Size > maxTransfer {
		return nil, fmt.Errorf("size %d is over the 1 GiB limit", f.Size)
	}
	d := net.Dialer{Timeout: 10 * time.Second}
	if f.Bind != "" {
		ip := net.ParseIP(f.Bind)
		if ip == nil {
			return nil, fmt.Errorf("bad bind address %q", f.Bind)
		}
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	target, err := f.target()
	if err != nil {
		return nil, err
	}
	conn, err := d.DialContext(ctx, target.Network, target.Address)
	if err != nil {
		return nil, err
	}
	c, err := nbd.NewClient(conn, &nbd.ClientOptions{NoBlockStatus: true, ExportName: target.ExportName})
	if err != nil {
		conn.Close()
		return nil, err
	}
	if end := f.From + f.Size; end < f.From || end > c.Size() {
		c.Close()
		return nil, fmt.Errorf("range %d+%d is beyond the export size %d", f.From, f.Size, c.Size())
	}
	return c, nil
}

// target is the export the URI or --addr and --port name.
func (f *remoteFlags) target() (nbd.URI, error) {
	switch {
	case f.URI != "" && (f.Addr != "" || f.Port != 0):
		return nbd.URI{}, errors.New("give a URI or --addr and --port, not both")
	case f.URI != "":
		u, err := nbd.ParseURI(f.URI)
		if err == nil && u.Network == "unix" && f.Bind != "" {
			err = errors.New("--bind does not go with a Unix socket")
		}
		return u, err
	case f.Addr == "" || f.Port == 0:
		return nbd.URI{}, errors.New("an NBD URI, or --addr and --port, are required")
	}
	return nbd.URI{Network: "tcp", Address: net.JoinHostPort(f.Addr, strconv.Itoa(int(f.Port)))}, nil
}

// ReadCmd is `flexnbd read`.
type ReadCmd struct{ remoteFlags }

// Run copies the range to standard output in order.
func (c *ReadCmd) Run() error {
	ctx := context.Background()
	client, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer client.Close()
	out := &stdout{}
	if err := client.ReadTo(ctx, out, c.From, c.Size, 0); err != nil {
		if out.err != nil {
			return fmt.Errorf("write to standard output: %w", out.err)
		}
		return fmt.Errorf("read: %w", err)
	}
	return nil
}

// stdout remembers its failure, which the client returns like any other.
type stdout struct{ err error }

func (w *stdout) Write(p []byte) (int, error) {
	n, err := os.Stdout.Write(p)
	if err != nil && w.err == nil {
		w.err = err
	}
	return n, err
}

// WriteCmd is `flexnbd write`.
type WriteCmd struct{ remoteFlags }

// Run copies exactly Size bytes of standard input to the range, then
// flushes so that success means durable.
func (c *WriteCmd) Run() error {
	ctx := context.Background()
	client, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer client.Close()
	in := &stdin{}
	if err := client.WriteFrom(ctx, in, c.From, c.Size, 0); err != nil {
		// The client asks for no more than Size bytes, so a failure of
		// standard input with bytes still missing is what stopped it.
		if in.err != nil && in.n < c.Size {
			return fmt.Errorf("standard input ended %d bytes short of %d", c.Size-in.n, c.Size)
		}
		return fmt.Errorf("write: %w", err)
	}
	if client.Flags()&nbd.FlagSendFlush != 0 {
		if err := client.Flush(ctx); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
	}
	return nil
}

// stdin counts what it delivered and remembers how it ended, so that a
// short input is told apart from a failed write.
type stdin struct {
	n   uint64
	err error
}

func (r *stdin) Read(p []byte) (int, error) {
	n, err := os.Stdin.Read(p)
	r.n += uint64(n)
	if err != nil && r.err == nil {
		r.err = err
	}
	return n, err
}
