// Package faultnet is a TCP forwarder for tests that breaks the link the
// ways networks break: it can cut every connection, swallow traffic
// without closing anything (a pulled cable or a stopped peer), refuse new
// connections, and slow the link to a given rate.
package faultnet

import (
	"context"
	"net"
	"sync"
	"time"
)

// Link forwards connections from its own address to a target.
type Link struct {
	l      net.Listener
	target string

	mu      sync.Mutex
	conns   map[net.Conn]struct{}
	stalled bool
	refuse  bool
	rate    uint64 // bytes per second in each direction; 0 unlimited
	// resumed is closed when a stall ends.
	resumed chan struct{}
	closed  bool
	wg      sync.WaitGroup
}

// New forwards connections made to the returned Link's Addr to target,
// until Close.
func New(target string) (*Link, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	k := &Link{l: l, target: target, conns: make(map[net.Conn]struct{}), resumed: make(chan struct{})}
	k.wg.Add(1)
	go k.accept()
	return k, nil
}

// Addr is where clients connect.
func (k *Link) Addr() string { return k.l.Addr().String() }

// SetTarget changes where new connections go.
func (k *Link) SetTarget(target string) {
	k.mu.Lock()
	k.target = target
	k.mu.Unlock()
}

// Cut closes every forwarded connection at once, as a reset would.
func (k *Link) Cut() {
	k.mu.Lock()
	defer k.mu.Unlock()
	for c := range k.conns {
		c.Close()
	}
}

// Stall stops moving bytes in both directions, without closing anything:
// both ends see a silent peer. New connections are accepted but stall too.
func (k *Link) Stall() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.stalled {
		k.stalled = true
		k.resumed = make(chan struct{})
	}
}

// Resume ends a stall; the bytes held back flow again.
func (k *Link) Resume() {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.stalled {
		k.stalled = false
		close(k.resumed)
	}
}

// Refuse makes new connections close at once (true) or be forwarded again.
func (k *Link) Refuse(on bool) {
	k.mu.Lock()
	k.refuse = on
	k.mu.Unlock()
}

// SetRate limits each direction of each connection to bytes per second; 0
// removes the limit.
func (k *Link) SetRate(bytesPerSecond uint64) {
	k.mu.Lock()
	k.rate = bytesPerSecond
	k.mu.Unlock()
}

// Close stops accepting and cuts every connection.
func (k *Link) Close() error {
	k.mu.Lock()
	k.closed = true
	k.mu.Unlock()
	err := k.l.Close()
	k.Cut()
	k.Resume()
	k.wg.Wait()
	return err
}

func (k *Link) accept() {
	defer k.wg.Done()
	for {
		c, err := k.l.Accept()
		if err != nil {
			return
		}
		k.mu.Lock()
		refuse, target := k.refuse, k.target
		k.mu.Unlock()
		if refuse {
			c.Close()
			continue
		}
		up, err := net.DialTimeout("tcp", target, 5*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		if !k.track(c, up) {
			continue
		}
		k.wg.Add(2)
		go k.pipe(up, c)
		go k.pipe(c, up)
	}
}

func (k *Link) track(a, b net.Conn) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		a.Close()
		b.Close()
		return false
	}
	k.conns[a] = struct{}{}
	k.conns[b] = struct{}{}
	return true
}

// pipe copies src to dst until either ends or fails, then closes both:
// NBD peers never half-close.
func (k *Link) pipe(dst, src net.Conn) {
	defer k.wg.Done()
	defer func() {
		k.mu.Lock()
		delete(k.conns, dst)
		delete(k.conns, src)
		k.mu.Unlock()
		dst.Close()
		src.Close()
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if werr := k.forward(dst, buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// forward writes p to dst, waiting out stalls and pacing to the rate.
func (k *Link) forward(dst net.Conn, p []byte) error {
	for len(p) > 0 {
		k.mu.Lock()
		stalled, resumed, rate := k.stalled, k.resumed, k.rate
		k.mu.Unlock()
		if stalled {
			<-resumed
			continue
		}
		n := len(p)
		if rate > 0 {
			// Pace in slices of about 10 ms.
			n = min(n, max(int(rate/100), 1))
			time.Sleep(time.Duration(float64(n) / float64(rate) * float64(time.Second)))
		}
		if _, err := dst.Write(p[:n]); err != nil {
			return err
		}
		p = p[n:]
	}
	return nil
}

// WaitConns waits until at least n connections are forwarded, or ctx ends.
func (k *Link) WaitConns(ctx context.Context, n int) error {
	for {
		k.mu.Lock()
		have := len(k.conns) / 2
		k.mu.Unlock()
		if have >= n {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Millisecond):
		}
	}
}
