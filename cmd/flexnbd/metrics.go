package main

import (
	"fmt"
	"net"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/metrics"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/proxy"
	"github.com/flexnbd/flexnbd/server"
)

// metricsFlags are shared by serve, listen and proxy: where to serve
// Prometheus metrics, off by default.
type metricsFlags struct {
	Metrics string `placeholder:"ADDR" help:"Serve Prometheus metrics at http://ADDR/metrics (host:port; port 0 picks one, logged as the field metrics; default: off)."`

	counters *server.Metrics // what the server counts into, once asked for
	bound    string          // the address the metrics listener got
}

// serverMetrics returns the counters for server.Config.Metrics: nil, so
// that the server counts nothing, unless --metrics is set.
func (f *metricsFlags) serverMetrics() *server.Metrics {
	if f.Metrics == "" {
		return nil
	}
	if f.counters == nil {
		f.counters = new(server.Metrics)
	}
	return f.counters
}

// serveInstance serves the metrics of a serve or listen instance. The
// listener opens now, so that a bad address fails before anything else
// is served; stop closes it.
func (f *metricsFlags) serveInstance(inst *instance) (stop func(), err error) {
	return f.serve(inst.log, metrics.NewServerCollector(inst.srv, f.serverMetrics()),
		metrics.NewMigrationCollector(inst.lastMirror))
}

// serveProxy serves the metrics of a proxy, as serveInstance does.
func (f *metricsFlags) serveProxy(p *proxy.Proxy, log zerolog.Logger) (stop func(), err error) {
	return f.serve(log, metrics.NewProxyCollector(p))
}

func (f *metricsFlags) serve(log zerolog.Logger, cs ...prometheus.Collector) (func(), error) {
	if f.Metrics == "" {
		return func() {}, nil
	}
	reg, err := metrics.NewRegistry(cs...)
	if err != nil {
		return nil, fmt.Errorf("--metrics: %w", err)
	}
	l, err := net.Listen("tcp", f.Metrics)
	if err != nil {
		return nil, fmt.Errorf("--metrics: %w", err)
	}
	f.bound = l.Addr().String()
	return metrics.Serve(l, reg, log), nil
}

// logField adds the metrics address to the event that announces serving,
// when there is one: with port 0 it is how the operator learns the port.
func (f *metricsFlags) logField(e *zerolog.Event) {
	if f.bound != "" {
		e.Str("metrics", f.bound)
	}
}

// lastMirror returns the migration in progress or the last one, if any.
func (h *instance) lastMirror() *mirror.Mirror {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.mirror
}
