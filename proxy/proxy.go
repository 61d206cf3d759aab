package proxy

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/nbd"
)

// ErrClosed is returned by Serve after Shutdown.
var ErrClosed = errors.New("proxy: closed")

// Proxy accepts NBD clients and forwards their requests, each client over
// its own upstream connection.
type Proxy struct {
	cfg Config
	log zerolog.Logger

	mu        sync.Mutex
	upstreams []Upstream
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	closing   bool
	wg        sync.WaitGroup

	stats stats
}

// stats are the figures Status reports.
type stats struct {
	reconnects    atomic.Uint64
	replayed      atomic.Uint64
	failed        atomic.Uint64 // requests answered EIO after MaxOutage
	cacheHits     atomic.Uint64 // READs answered from the prefetch
	longestOutage atomic.Int64  // nanoseconds
	inUse         atomic.Pointer[string]
}

// New checks cfg and returns a proxy that serves nothing yet.
func New(cfg Config) (*Proxy, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	return &Proxy{
		cfg:       cfg,
		log:       cfg.Logger,
		upstreams: append([]Upstream(nil), cfg.Upstreams...),
		listeners: map[net.Listener]struct{}{},
		conns:     map[*conn]struct{}{},
	}, nil
}

// SetUpstreams replaces the upstream list; connections use it the next
// time they connect. It does not move connections that work.
func (p *Proxy) SetUpstreams(us []Upstream) error {
	if len(us) == 0 {
		return errors.New("proxy: no upstream")
	}
	p.mu.Lock()
	p.upstreams = append([]Upstream(nil), us...)
	p.mu.Unlock()
	p.log.Info().Str("upstreams", fmt.Sprint(us)).Msg("upstreams replaced")
	return nil
}

// Upstreams returns the current list.
func (p *Proxy) Upstreams() []Upstream {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]Upstream(nil), p.upstreams...)
}

// Serve accepts clients on l until Shutdown, then returns ErrClosed.
func (p *Proxy) Serve(l net.Listener) error {
	p.mu.Lock()
	if p.closing {
		p.mu.Unlock()
		return ErrClosed
	}
	p.listeners[l] = struct{}{}
	p.mu.Unlock()
	defer func() {
		p.mu.Lock()
		delete(p.listeners, l)
		p.mu.Unlock()
	}()
	var delay time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			p.mu.Lock()
			closing := p.closing
			p.mu.Unlock()
			if closing {
				return ErrClosed
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ECONNABORTED) {
				delay = min(max(2*delay, 5*time.Millisecond), time.Second)
				p.log.Warn().Err(err).Dur("retry_in", delay).Msg("accept failed")
				time.Sleep(delay)
				continue
			}
			return err
		}
		delay = 0
		c := newConn(p, nc)
		p.mu.Lock()
		if p.closing {
			p.mu.Unlock()
			nc.Close()
			continue
		}
		p.conns[c] = struct{}{}
		p.wg.Add(1)
		p.mu.Unlock()
		go func() {
			defer p.wg.Done()
			c.serve()
			p.mu.Lock()
			delete(p.conns, c)
			p.mu.Unlock()
		}()
	}
}

// Shutdown stops accepting, lets every client's requests in flight finish
// and closes the clients, or closes them at once when ctx ends first.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closing = true
	for l := range p.listeners {
		l.Close()
	}
	for c := range p.conns {
		c.drain()
	}
	p.mu.Unlock()
	done := make(chan struct{})
	go func() {
		p.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		p.mu.Lock()
		for c := range p.conns {
			c.abort()
		}
		p.mu.Unlock()
		<-done
		return ctx.Err()
	}
}

// Status is what the proxy reports about itself.
type Status struct {
	Upstreams      []Upstream
	InUse          string // the upstream the newest connection reached
	Connected      int    // clients whose upstream connection is up
	Clients        int
	Reconnects     uint64
	Replayed       uint64
	FailedRequests uint64
	CacheHits      uint64
	LongestOutage  time.Duration
}

// Status returns the current figures.
func (p *Proxy) Status() Status {
	p.mu.Lock()
	st := Status{Upstreams: append([]Upstream(nil), p.upstreams...), Clients: len(p.conns)}
	for c := range p.conns {
		if c.connected() {
			st.Connected++
		}
	}
	p.mu.Unlock()
	if u := p.stats.inUse.Load(); u != nil {
		st.InUse = *u
	}
	st.Reconnects = p.stats.reconnects.Load()
	st.Replayed = p.stats.replayed.Load()
	st.FailedRequests = p.stats.failed.Load()
	st.CacheHits = p.stats.cacheHits.Load()
	st.LongestOutage = time.Duration(p.stats.longestOutage.Load())
	return st
}

// dialOnce tries every upstream once, in order, and returns the first
// connection whose handshake succeeds and whose size is want (any size
// when want is 0).
func (p *Proxy) dialOnce(ctx context.Context, want uint64, f *fence, onIdle func()) (*nbd.Client, Upstream, error) {
	var errs []error
	for _, u := range p.Upstreams() {
		c, err := p.dial(ctx, u, f, onIdle)
		if err == nil && want != 0 && c.Size() != want {
			c.Abort()
			err = fmt.Errorf("export size %d, expected %d", c.Size(), want)
		}
		if err == nil {
			return c, u, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", u, err))
		if ctx.Err() != nil {
			break
		}
	}
	return nil, Upstream{}, errors.Join(errs...)
}

// fence is a client's fence key and the generation of its latest
// connection attempt (nbd.OptFence): every attempt takes the next one, so
// a handshake the proxy gave up on can never displace a later connection.
type fence struct {
	key string
	gen uint64
}

func (p *Proxy) dial(ctx context.Context, u Upstream, f *fence, onIdle func()) (*nbd.Client, error) {
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	d := net.Dialer{}
	if u.Network == "tcp" && p.cfg.Bind != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(p.cfg.Bind)}
	}
	nc, err := d.DialContext(ctx, u.Network, u.Address)
	if err != nil {
		return nil, err
	}
	deadline, _ := ctx.Deadline()
	f.gen++
	c, err := nbd.NewClient(nc, &nbd.ClientOptions{
		MaxInFlight:      p.cfg.MaxInFlight,
		HandshakeTimeout: time.Until(deadline),
		FenceKey:         f.key,
		FenceGen:         f.gen,
		OnIdle:           onIdle,
	})
	if err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

// connect dials in rounds until an upstream answers, ctx ends, or, with
// MaxOutage set, giveUp passes (then it returns errOutage). The first
// round starts at once; later ones after an exponential backoff with
// jitter, capped at RetryMax.
func (p *Proxy) connect(ctx context.Context, want uint64, giveUp time.Time, f *fence, onIdle func()) (*nbd.Client, error) {
	backoff := 50 * time.Millisecond
	for round := 0; ; round++ {
		c, u, err := p.dialOnce(ctx, want, f, onIdle)
		if err == nil {
			s := u.String()
			p.stats.inUse.Store(&s)
			return c, nil
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		if round == 0 || round%10 == 0 {
			p.log.Warn().Err(err).Int("round", round+1).Msg("no upstream answers; retrying")
		}
		wait := backoff/2 + rand.N(backoff/2+1)
		backoff = min(2*backoff, p.cfg.RetryMax)
		if !giveUp.IsZero() {
			left := time.Until(giveUp)
			if left <= 0 {
				return nil, errOutage
			}
			wait = min(wait, left)
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// errOutage: the upstream stayed unreachable for MaxOutage.
var errOutage = errors.New("proxy: upstream unreachable for longer than the allowed outage")

// noteOutage records an outage's length for Status.
func (p *Proxy) noteOutage(d time.Duration) {
	for {
		old := p.stats.longestOutage.Load()
		if int64(d) <= old || p.stats.longestOutage.CompareAndSwap(old, int64(d)) {
			return
		}
	}
}
