package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/flexnbd/flexnbd/proxy"
)

var (
	proxyClientsDesc = prometheus.NewDesc("flexnbd_proxy_clients",
		"Clients connected to the proxy.", nil, nil)
	proxyConnectedDesc = prometheus.NewDesc("flexnbd_proxy_connected_clients",
		"Clients whose upstream connection is up.", nil, nil)
	reconnectsDesc = prometheus.NewDesc("flexnbd_proxy_reconnects_total",
		"Upstream connections lost and made again.", nil, nil)
	replayedDesc = prometheus.NewDesc("flexnbd_proxy_replayed_requests_total",
		"Requests sent again to the upstream after a reconnection.", nil, nil)
	failedDesc = prometheus.NewDesc("flexnbd_proxy_failed_requests_total",
		"Requests answered EIO because the upstream stayed away longer than --max-outage.", nil, nil)
	cacheHitsDesc = prometheus.NewDesc("flexnbd_proxy_cache_hits_total",
		"Reads answered from the read-ahead cache.", nil, nil)
	outageDesc = prometheus.NewDesc("flexnbd_proxy_longest_outage_seconds",
		"Longest time a client waited for its upstream connection to come back.", nil, nil)
)

type proxyCollector struct{ p *proxy.Proxy }

// NewProxyCollector exports what p.Status reports.
func NewProxyCollector(p *proxy.Proxy) prometheus.Collector { return proxyCollector{p: p} }

func (c proxyCollector) Describe(ch chan<- *prometheus.Desc) {
	describe(ch, proxyClientsDesc, proxyConnectedDesc, reconnectsDesc, replayedDesc, failedDesc, cacheHitsDesc,
		outageDesc)
}

func (c proxyCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.p.Status()
	ch <- gauge(proxyClientsDesc, float64(st.Clients))
	ch <- gauge(proxyConnectedDesc, float64(st.Connected))
	ch <- counter(reconnectsDesc, float64(st.Reconnects))
	ch <- counter(replayedDesc, float64(st.Replayed))
	ch <- counter(failedDesc, float64(st.FailedRequests))
	ch <- counter(cacheHitsDesc, float64(st.CacheHits))
	ch <- gauge(outageDesc, st.LongestOutage.Seconds())
}
