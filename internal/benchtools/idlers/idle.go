package main

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/flexnbd/flexnbd/nbd"
)

type options struct {
	addr     string
	export   string
	conns    int
	parallel int
	timeout  time.Duration
}

// idleSet is a set of negotiated connections that send nothing.
type idleSet struct {
	clients []*nbd.Client
}

// open negotiates o.conns connections, o.parallel at a time: a server that
// forks per connection, or accepts slowly, sees a steady stream instead of
// a burst beyond its listen backlog. It fails, closing what it opened, if
// any connection cannot be opened within o.timeout.
func open(ctx context.Context, o options) (*idleSet, error) {
	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	set := &idleSet{clients: make([]*nbd.Client, o.conns)}
	slots := make(chan struct{}, o.parallel)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	for i := range set.clients {
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-slots }()
			// A small MaxInFlight: these clients never send a request, and
			// the semaphore is allocated per client.
			c, err := nbd.Dial(ctx, "tcp", o.addr, &nbd.ClientOptions{ExportName: o.export, MaxInFlight: 1})
			if err != nil {
				mu.Lock()
				if firstErr == nil {
					firstErr = fmt.Errorf("connection %d: %w", i+1, err)
				}
				mu.Unlock()
				cancel()
				return
			}
			set.clients[i] = c
		}()
	}
	wg.Wait()
	if firstErr == nil && ctx.Err() != nil {
		firstErr = fmt.Errorf("opening %d connections: %w", o.conns, ctx.Err())
	}
	if firstErr != nil {
		set.close(time.Second)
		return nil, firstErr
	}
	return set, nil
}

// open counts the connections the server has not closed. A connection
// the server closed is noticed by its reply reader, which then sets Err.
func (s *idleSet) open() int {
	n := 0
	for _, c := range s.clients {
		if c != nil && c.Err() == nil {
			n++
		}
	}
	return n
}

// close disconnects every connection, all at once, each given up to wait
// for the server to confirm.
func (s *idleSet) close(wait time.Duration) {
	ctx, cancel := context.WithTimeout(context.Background(), wait)
	defer cancel()
	var wg sync.WaitGroup
	for _, c := range s.clients {
		if c == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = c.Disconnect(ctx)
		}()
	}
	wg.Wait()
}
