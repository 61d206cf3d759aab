package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/flexnbd/flexnbd/server"
)

var (
	requestsDesc = prometheus.NewDesc("flexnbd_requests_total",
		"Requests answered, failed ones included, by command.", []string{"command"}, nil)
	bytesDesc = prometheus.NewDesc("flexnbd_request_bytes_total",
		"Bytes covered by the requests that succeeded, by command.", []string{"command"}, nil)
	durationDesc = prometheus.NewDesc("flexnbd_request_duration_seconds",
		"Time from reading a request's header to handing its reply to the socket, by command.",
		[]string{"command"}, nil)
	errorsDesc = prometheus.NewDesc("flexnbd_request_errors_total",
		"Error replies, refusals included, by NBD error code.", []string{"errno"}, nil)
	gateWaitsDesc = prometheus.NewDesc("flexnbd_gate_waits_total",
		"Requests that waited in the ordering gate for an earlier overlapping request.", nil, nil)
	clientsDesc = prometheus.NewDesc("flexnbd_clients",
		"Connected clients, those still negotiating included.", nil, nil)
	connectionsDesc = prometheus.NewDesc("flexnbd_connections_total",
		"Connections accepted or rejected since the start.", nil, nil)
	rejectedDesc = prometheus.NewDesc("flexnbd_connections_rejected_total",
		"Connections closed before any greeting: refused by the access list or beyond --max-clients.", nil, nil)
	turnsDesc = prometheus.NewDesc("flexnbd_turns_total",
		"Times a connection's reader, having run requests for 50 microseconds without waiting, yielded the processor because other connections had unread requests.", nil, nil)
	sizeDesc = prometheus.NewDesc("flexnbd_export_size_bytes", "Size of the export.", nil, nil)
)

// latencyBounds are server.LatencyBuckets in seconds.
var latencyBounds = func() []float64 {
	b := make([]float64, len(server.LatencyBuckets))
	for i, d := range server.LatencyBuckets {
		b[i] = d.Seconds()
	}
	return b
}()

// serverCollector reads a server's counters at scrape time.
type serverCollector struct {
	srv *server.Server
	m   *server.Metrics
}

// NewServerCollector exports the figures of srv, which counts into m
// (its Config.Metrics).
func NewServerCollector(srv *server.Server, m *server.Metrics) prometheus.Collector {
	return serverCollector{srv: srv, m: m}
}

func (c serverCollector) Describe(ch chan<- *prometheus.Desc) {
	describe(ch, requestsDesc, bytesDesc, durationDesc, errorsDesc, gateWaitsDesc, clientsDesc,
		connectionsDesc, rejectedDesc, turnsDesc, sizeDesc)
}

func (c serverCollector) Collect(ch chan<- prometheus.Metric) {
	for _, f := range c.m.Commands() {
		ch <- counter(requestsDesc, float64(f.Requests), f.Command)
		ch <- counter(bytesDesc, float64(f.Bytes), f.Command)
		buckets := make(map[float64]uint64, len(latencyBounds))
		var cumulative uint64
		for i, le := range latencyBounds {
			cumulative += f.Buckets[i]
			buckets[le] = cumulative
		}
		ch <- prometheus.MustNewConstHistogram(durationDesc, f.Requests, f.Latency.Seconds(), buckets, f.Command)
	}
	for _, e := range c.m.Errors() {
		ch <- counter(errorsDesc, float64(e.Count), e.Errno)
	}
	ch <- counter(gateWaitsDesc, float64(c.m.GateWaits()))
	st := c.srv.Stats()
	ch <- gauge(clientsDesc, float64(st.Clients))
	ch <- counter(connectionsDesc, float64(st.ConnectionsSeen))
	ch <- counter(rejectedDesc, float64(st.Rejected))
	ch <- counter(turnsDesc, float64(st.Turns))
	ch <- gauge(sizeDesc, float64(c.srv.Size()))
}
