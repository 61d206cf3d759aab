package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"time"

	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/proxy"
)

// ProxyCmd is `flexnbd proxy`, also run as `flexnbd-proxy`, with the C
// flexnbd-proxy's flags.
type ProxyCmd struct {
	ConnAddr  string        `short:"C" name:"conn-addr" required:"" help:"Upstream server address, or the path of its Unix socket."`
	ConnPort  uint16        `short:"P" name:"conn-port" help:"Upstream server port."`
	Bind      string        `short:"b" help:"Local address for upstream connections."`
	Oldstyle  bool          `help:"Greet clients with the oldstyle handshake (C flexnbd fleets)."`
	MaxOutage time.Duration `name:"max-outage" help:"Fail requests with EIO once the upstream has been unreachable this long (default: never)."`
	Sock      string        `short:"s" help:"Control socket path (status, upstream)."`
	Cache     int           `type:"size" placeholder:"SIZE" help:"Read-ahead per client: a read of at most half of SIZE fetches twice its length and keeps the rest for the next read (--cache alone: 64 KiB; default: off)."`
	Procs     int           `placeholder:"N" help:"Processors the proxy runs its goroutines on at once (default 0: one per CPU; 1: faster for one client, less fair between several)."`
	listenFlags
	metricsFlags
	LogFlags
}

// Run proxies until SIGINT, SIGTERM or SIGQUIT, then answers what it has
// read and exits 0.
func (c *ProxyCmd) Run() error {
	log := c.logger()
	up, err := c.upstream()
	if err != nil {
		return err
	}
	if c.Bind != "" && net.ParseIP(c.Bind) == nil {
		return errors.New("--bind: not an IP address: " + strconv.Quote(c.Bind))
	}
	if c.MaxOutage < 0 {
		return errors.New("--max-outage must not be negative")
	}
	if c.Procs < 0 {
		return errors.New("--procs must not be negative")
	}
	if c.Procs > 0 {
		// On one processor a reply read upstream is answered by the same
		// thread without waking another: faster for one client, but a
		// client copying large writes then delays the others' requests
		// more (docs/BENCHMARKS.md, "Proxy"), so it is not the default.
		runtime.GOMAXPROCS(c.Procs)
	}
	p, err := proxy.New(proxy.Config{
		Upstreams: []proxy.Upstream{up},
		Bind:      c.Bind,
		Oldstyle:  c.Oldstyle,
		MaxOutage: c.MaxOutage,
		Cache:     c.Cache,
		Logger:    log,
	})
	if err != nil {
		return err
	}
	l, err := c.listen()
	if err != nil {
		return err
	}
	stopMetrics, err := c.serveProxy(p, log)
	if err != nil {
		l.Close()
		return err
	}
	defer stopMetrics()
	sigs := notifyStop()
	defer signal.Stop(sigs)
	log.Info().Str("listen", l.Addr().String()).Str("upstream", up.String()).Bool("oldstyle", c.Oldstyle).
		Int("procs", runtime.GOMAXPROCS(0)).Func(c.logField).Msg("proxying")

	served := make(chan error, 1)
	go func() { served <- p.Serve(l) }()
	// The control socket appears once the proxy listens, as for serve.
	ctl, ctlErr, err := startControl(c.Sock, &proxyHandler{p: p, started: time.Now()}, log)
	if err != nil {
		l.Close()
		<-served
		return err
	}
	defer ctlShutdown(ctl, log)
	c.printURI(l, "")
	notifyReady(log)
	select {
	case err := <-served:
		return err
	case err := <-ctlErr:
		l.Close()
		<-served
		return err
	case sig := <-sigs:
		log.Info().Str("signal", sig.String()).Msg("shutting down")
		notifyStopping(log)
	}
	ctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := p.Shutdown(ctx); err != nil {
		log.Warn().Err(err).Msg("clients dropped with requests unanswered")
	}
	<-served
	log.Info().Msg("stopped")
	return nil
}

func (c *ProxyCmd) upstream() (proxy.Upstream, error) {
	if strings.HasPrefix(c.ConnAddr, "/") {
		if c.ConnPort != 0 {
			return proxy.Upstream{}, errors.New("--conn-port does not go with a Unix socket path")
		}
		return proxy.Upstream{Network: "unix", Address: c.ConnAddr}, nil
	}
	if c.ConnPort == 0 {
		return proxy.Upstream{}, errors.New("--conn-port is required with a TCP upstream")
	}
	return proxy.ParseUpstream(net.JoinHostPort(c.ConnAddr, strconv.Itoa(int(c.ConnPort))))
}

// defaultProxyCache is the read-ahead buffer of a bare --cache: it covers
// reads up to 32 KiB.
const defaultProxyCache = 64 << 10

// proxyHandler answers the control socket for a proxy: status and
// upstream; a server's commands are refused.
type proxyHandler struct {
	p       *proxy.Proxy
	started time.Time
}

func (h *proxyHandler) Status() control.StatusInfo {
	st := h.p.Status()
	ups := make([]string, len(st.Upstreams))
	for i, u := range st.Upstreams {
		ups[i] = u.String()
	}
	return control.StatusInfo{
		PID:     os.Getpid(),
		Uptime:  time.Since(h.started),
		Version: buildVersion(),
		Proxy: &control.ProxyStatus{
			InUse: st.InUse, Upstreams: ups, Clients: st.Clients, Connected: st.Connected,
			Reconnects: st.Reconnects, Replayed: st.Replayed, Failed: st.FailedRequests, CacheHits: st.CacheHits,
			LongestOutage: st.LongestOutage,
		},
	}
}

// SetUpstreams parses every entry before replacing the list, so a typo
// changes nothing.
func (h *proxyHandler) SetUpstreams(entries []string) error {
	us := make([]proxy.Upstream, 0, len(entries))
	for _, e := range entries {
		u, err := proxy.ParseUpstream(e)
		if err != nil {
			return fmt.Errorf("bad upstream: %s", e)
		}
		us = append(us, u)
	}
	return h.p.SetUpstreams(us)
}

func (h *proxyHandler) SetACL([]string) error { return control.ErrProxy }
func (h *proxyHandler) Mirror(context.Context, control.MirrorRequest) error {
	return control.ErrProxy
}
func (h *proxyHandler) Break(context.Context) error { return control.ErrProxy }
func (h *proxyHandler) SetMirrorSpeed(uint64) error { return control.ErrProxy }
func (h *proxyHandler) WaitMirror(context.Context) (string, error) {
	return "", control.ErrProxy
}
