package proxy

import (
	"slices"
	"time"

	"github.com/flexnbd/flexnbd/nbd"
)

// reconnector replaces failed upstream connections until the client is
// gone: it connects again (each round trying every upstream) and sends
// every unanswered request again, oldest first, before the reader may
// send anything newer. With MaxOutage, once the upstream has been
// unreachable that long, what waits fails with EIO, and so does every new
// request until an upstream answers.
func (c *conn) reconnector() {
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-c.wake:
		}
		c.smu.Lock()
		if !c.broken() {
			c.smu.Unlock()
			continue
		}
		if c.up != nil {
			c.log.Warn().Err(c.up.Err()).Msg("upstream connection lost; reconnecting")
			c.up.Abort()
			c.up = nil
			c.upShared.Store(nil)
		}
		c.smu.Unlock()
		c.p.stats.reconnects.Add(1)
		if !c.reconnect() {
			return
		}
	}
}

// reconnect connects again and replays; false when the client is gone.
func (c *conn) reconnect() bool {
	start := time.Now()
	var giveUp time.Time
	if c.p.cfg.MaxOutage > 0 {
		giveUp = start.Add(c.p.cfg.MaxOutage)
	}
	var up *nbd.Client
	for {
		var err error
		up, err = c.p.connect(c.ctx, c.size, giveUp, &c.fence, c.flushOut)
		if err == nil {
			break
		}
		if c.ctx.Err() != nil {
			return false
		}
		// The outage outlasted MaxOutage: fail what waits, and go on
		// trying; requests arriving meanwhile fail at once.
		c.smu.Lock()
		c.failing = true
		c.failPending()
		c.smu.Unlock()
		giveUp = time.Time{}
	}
	outage := time.Since(start)
	c.p.noteOutage(outage)
	c.smu.Lock()
	defer c.smu.Unlock()
	c.cache.forget()
	c.up, c.failing = up, false
	c.upShared.Store(up)
	c.gen.Add(1)
	c.stale.Store(false)
	c.noteFence()
	c.pmu.Lock()
	ops := make([]*op, 0, len(c.pending))
	for _, o := range c.pending {
		ops = append(ops, o)
	}
	c.pmu.Unlock()
	slices.SortFunc(ops, func(a, b *op) int { return int(int64(a.seq - b.seq)) })
	c.log.Info().Dur("outage", outage).Int("replayed", len(ops)).Msg("upstream reconnected")
	for _, o := range ops {
		c.send(o)
	}
	c.flushUp()
	return true
}

// noteFence warns when the upstream cannot fence: a replay after a
// timeout could then be overtaken by its original.
func (c *conn) noteFence() {
	if !c.up.Session().Fenced {
		c.log.Warn().Msg("upstream does not take fences (not a flexnbd server): a request replayed after a timeout may be overtaken by its original")
	}
}

// watchdog gives up on an upstream connection whose oldest request has
// waited longer than the timeout for its reply, and fails requests older
// than MaxOutage.
func (c *conn) watchdog() {
	period := c.p.cfg.Timeout
	if c.p.cfg.MaxOutage > 0 {
		period = min(period, c.p.cfg.MaxOutage)
	}
	tick := time.NewTicker(min(max(period/4, 10*time.Millisecond), time.Second))
	defer tick.Stop()
	for {
		select {
		case <-c.ctx.Done():
			return
		case <-tick.C:
		}
		gen := c.gen.Load()
		var oldest time.Time
		c.pmu.Lock()
		for _, o := range c.pending {
			if o.gen == gen && o.sends > 0 && (oldest.IsZero() || o.sentAt.Before(oldest)) {
				oldest = o.sentAt
			}
		}
		c.pmu.Unlock()
		c.failOverdue()
		if !oldest.IsZero() && time.Since(oldest) > c.p.cfg.Timeout && !c.stale.Load() && c.gen.Load() == gen {
			c.log.Warn().Dur("waited", time.Since(oldest)).Msg("upstream reply overdue")
			c.stale.Store(true)
			// Closing the connection also frees a sender waiting for
			// a slot among requests that will never be answered.
			if up := c.upShared.Load(); up != nil {
				up.Abort()
			}
			c.kick()
		}
	}
}

// failOverdue answers EIO to requests that have waited longer than
// MaxOutage, whether the upstream is unreachable or only silent.
func (c *conn) failOverdue() {
	limit := c.p.cfg.MaxOutage
	if limit <= 0 {
		return
	}
	var late []*op
	c.pmu.Lock()
	for _, o := range c.pending {
		if time.Since(o.arrived) > limit {
			late = append(late, o)
		}
	}
	c.pmu.Unlock()
	for _, o := range late {
		c.p.stats.failed.Add(1)
		c.answer(o, nil, nbd.EIO, true)
	}
}

// failPending answers every pending request with EIO.
func (c *conn) failPending() {
	c.pmu.Lock()
	ops := make([]*op, 0, len(c.pending))
	for _, o := range c.pending {
		ops = append(ops, o)
	}
	c.pmu.Unlock()
	for _, o := range ops {
		c.p.stats.failed.Add(1)
		c.answer(o, nil, nbd.EIO, true)
	}
}
