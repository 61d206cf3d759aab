package control

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"syscall"
	"time"
)

// DefaultClientTimeout bounds a whole conversation unless the Client says
// otherwise: long enough for a mirror to reach its destination.
const DefaultClientTimeout = 2 * time.Minute

// Client talks to a control socket, one conversation per call.
type Client struct {
	// Path is the socket's path.
	Path string
	// Timeout bounds each conversation, connecting included; zero means
	// DefaultClientTimeout, and a negative one leaves the bound to the
	// context (mirror_wait lasts as long as the migration).
	Timeout time.Duration
}

// UnreachableError reports a control socket that could not be connected
// to: no such file, nobody listening, no permission.
type UnreachableError struct {
	Path string
	Err  error
}

// Error names the socket and the system's reason in one line.
func (e *UnreachableError) Error() string {
	reason := e.Err
	var se *os.SyscallError
	if errors.As(e.Err, &se) {
		reason = se.Err // "connection refused" rather than the whole chain
	}
	return fmt.Sprintf("cannot reach control socket %s: %v", e.Path, reason)
}

// Unwrap returns the dial error.
func (e *UnreachableError) Unwrap() error { return e.Err }

// Do sends command with args and returns the server's reply. A reply with
// a non-zero code is not an error; failing to connect (an
// *UnreachableError), to send or to read a well-formed reply is.
func (c *Client) Do(ctx context.Context, command string, args ...string) (Reply, error) {
	req, err := appendRequest(nil, command, args)
	if err != nil {
		return Reply{}, err
	}
	timeout := c.Timeout
	if timeout == 0 {
		timeout = DefaultClientTimeout
	}
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	var d net.Dialer
	nc, err := d.DialContext(ctx, "unix", c.Path)
	if err != nil {
		if ctx.Err() != nil {
			return Reply{}, fmt.Errorf("control: %s: %w", c.Path, ctx.Err())
		}
		return Reply{}, &UnreachableError{Path: c.Path, Err: err}
	}
	defer nc.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = nc.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = nc.SetDeadline(time.Now()) })
	defer stop()

	if _, err := nc.Write(req); err != nil && !errors.Is(err, syscall.EPIPE) {
		// A server that answered early and hung up (EPIPE) has still
		// left its reply to read.
		return Reply{}, fmt.Errorf("control: send %s: %w", command, err)
	}
	line, err := bufio.NewReaderSize(io.LimitReader(nc, maxReplyBytes), 4096).ReadString('\n')
	if err != nil && !(errors.Is(err, io.EOF) && line != "") {
		if errors.Is(err, io.EOF) {
			return Reply{}, fmt.Errorf("control: %s closed without a reply", c.Path)
		}
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return Reply{}, fmt.Errorf("control: no reply from %s within %v", c.Path, timeout)
		}
		return Reply{}, fmt.Errorf("control: read reply to %s: %w", command, err)
	}
	return parseReply(line)
}

// Status asks for the status line and splits it into fields. A non-zero
// reply is returned with no fields and no error.
func (c *Client) Status(ctx context.Context) (Reply, []Field, error) {
	r, err := c.Do(ctx, CmdStatus)
	if err != nil || !r.OK() {
		return r, nil, err
	}
	fields, err := ParseFields(r.Message)
	return r, fields, err
}
