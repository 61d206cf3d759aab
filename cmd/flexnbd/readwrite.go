package main

import (
	"context"
	"fmt"
	"io"
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
	Addr string `short:"l" required:"" help:"Server address."`
	Port uint16 `short:"p" required:"" help:"Server port."`
	From uint64 `short:"F" required:"" help:"Offset of the first byte."`
	Size uint64 `short:"S" required:"" help:"Number of bytes (at most 1 GiB)."`
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
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(f.Addr, strconv.Itoa(int(f.Port))))
	if err != nil {
		return nil, err
	}
	c, err := nbd.NewClient(conn, &nbd.ClientOptions{NoBlockStatus: true})
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

// chunk is the request size used by read and write; the spec's default
// maximum, honoured by every server.
const chunk = 4 << 20

// pipelineDepth is how many requests read and write keep in flight.
const pipelineDepth = 4

// ReadCmd is `flexnbd read`.
type ReadCmd struct{ remoteFlags }

// Run copies the range to standard output in order, with several requests
// in flight.
func (c *ReadCmd) Run() error {
	ctx := context.Background()
	client, err := c.dial(ctx)
	if err != nil {
		return err
	}
	defer client.Close()
	type piece struct {
		buf  []byte
		done chan error
	}
	queue := make(chan *piece, pipelineDepth)
	go func() {
		defer close(queue)
		for off := c.From; off < c.From+c.Size; off += chunk {
			p := &piece{buf: make([]byte, min(chunk, c.From+c.Size-off)), done: make(chan error, 1)}
			queue <- p
			go func(off uint64) { p.done <- client.Read(ctx, p.buf, off, 0) }(off)
		}
	}()
	out := io.Writer(os.Stdout)
	var firstErr error
	for p := range queue {
		err := <-p.done
		if firstErr == nil && err != nil {
			firstErr = fmt.Errorf("read: %w", err)
		}
		if firstErr == nil {
			if _, err := out.Write(p.buf); err != nil {
				firstErr = fmt.Errorf("write to standard output: %w", err)
			}
		}
	}
	return firstErr
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
	sem := make(chan struct{}, pipelineDepth)
	errs := make(chan error, 1)
	report := func(err error) {
		select {
		case errs <- err:
		default:
		}
	}
	for off := c.From; off < c.From+c.Size; off += chunk {
		buf := make([]byte, min(chunk, c.From+c.Size-off))
		if n, err := io.ReadFull(os.Stdin, buf); err != nil {
			report(fmt.Errorf("standard input ended %d bytes short of %d", c.From+c.Size-off-uint64(n), c.Size))
			break
		}
		sem <- struct{}{}
		go func(off uint64) {
			defer func() { <-sem }()
			if err := client.Write(ctx, buf, off, 0); err != nil {
				report(fmt.Errorf("write at %d: %w", off, err))
			}
		}(off)
	}
	for i := 0; i < pipelineDepth; i++ {
		sem <- struct{}{}
	}
	select {
	case err := <-errs:
		return err
	default:
	}
	if client.Flags()&nbd.FlagSendFlush != 0 {
		if err := client.Flush(ctx); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
	}
	return nil
}
