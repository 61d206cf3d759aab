package proxy

import (
	"errors"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/rs/zerolog"
)

// Upstream is a server the proxy may connect to.
type Upstream struct {
	Network string // "tcp" or "unix"
	Address string // host:port, or a socket path
}

// String is the upstream as ParseUpstream reads it.
func (u Upstream) String() string { return u.Address }

// ParseUpstream reads "host:port", "[v6]:port" or a Unix socket path
// (anything starting with "/").
func ParseUpstream(s string) (Upstream, error) {
	if strings.HasPrefix(s, "/") {
		return Upstream{Network: "unix", Address: s}, nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return Upstream{}, err
	}
	if host == "" {
		return Upstream{}, errors.New("no host in " + strconv.Quote(s))
	}
	if n, err := strconv.Atoi(port); err != nil || n <= 0 || n > 65535 {
		return Upstream{}, errors.New("bad port in " + strconv.Quote(s))
	}
	return Upstream{Network: "tcp", Address: net.JoinHostPort(host, port)}, nil
}

// Config describes a proxy. Upstreams must not be empty.
type Config struct {
	// Upstreams are tried in order at every (re)connection.
	Upstreams []Upstream
	// Bind is the local address for upstream TCP connections; "" lets the
	// system choose.
	Bind string
	// Oldstyle greets downstream clients with the C flexnbd's oldstyle
	// handshake instead of fixed newstyle.
	Oldstyle bool
	// Timeout is how long a request may wait for its upstream reply (and
	// a connection for its handshake) before the connection is given up
	// and its requests replayed on a new one. Default: the
	// FLEXNBD_UPSTREAM_TIMEOUT environment variable (seconds), else 30 s.
	Timeout time.Duration
	// MaxOutage, when not zero, fails requests with EIO once the upstream
	// has been unreachable that long. Zero waits forever.
	MaxOutage time.Duration
	// RetryMax caps the backoff between reconnection rounds. Default 5 s.
	RetryMax time.Duration
	// MaxInFlight bounds each connection's requests in flight upstream.
	// Default 64.
	MaxInFlight int
	// Cache is the read-ahead buffer of each client in bytes (0: none): a
	// READ of at most half of it fetches twice its length and keeps the
	// second half for the next READ (see prefetch).
	Cache  int
	Logger zerolog.Logger
}

// nbdMaxPayload is the largest READ a proxy sends upstream, so a
// read-ahead buffer is at most that.
const nbdMaxPayload = 32 << 20

// TimeoutEnv overrides the default upstream timeout, in seconds, as in the
// C flexnbd-proxy.
const TimeoutEnv = "FLEXNBD_UPSTREAM_TIMEOUT"

func (c *Config) setDefaults() error {
	if len(c.Upstreams) == 0 {
		return errors.New("proxy: no upstream")
	}
	if c.Timeout <= 0 {
		c.Timeout = 30 * time.Second
		if v := os.Getenv(TimeoutEnv); v != "" {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil || f <= 0 || f > 7*24*3600 {
				return errors.New("proxy: " + TimeoutEnv + " must be a number of seconds, got " + strconv.Quote(v))
			}
			c.Timeout = time.Duration(f * float64(time.Second))
		}
	}
	if c.RetryMax <= 0 {
		c.RetryMax = 5 * time.Second
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = 64
	}
	if c.Cache < 0 || c.Cache > nbdMaxPayload {
		return errors.New("proxy: cache must be between 0 and 32 MiB")
	}
	return nil
}
