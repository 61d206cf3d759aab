// Package metrics exports flexnbd's figures to Prometheus.
//
// The packages that do the work keep their own counters, plain atomics
// that cost the request path next to nothing (server.Metrics, the
// mirror's and the proxy's Status), and know nothing of Prometheus. The
// collectors here read those counters only when /metrics is scraped and
// turn them into constant metrics, so nothing is updated twice and no
// label lookup happens per request. Names start with flexnbd_; the
// process and Go runtime collectors come with every registry.
//
// BUG(metrics): A migration's figures are those of the current or last
// migration out of the instance (as the control socket's status reports
// them): they start again from zero when a new migration starts, and they
// are gauges for that reason.
//
// BUG(metrics): The proxy's outage figure is the longest outage so far,
// not a distribution of outages.
package metrics
