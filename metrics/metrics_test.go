package metrics_test

import (
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/metrics"
	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/proxy"
	"github.com/flexnbd/flexnbd/server"
)

// servedWith starts a server counting into m and sends it writes 4 KiB
// writes and reads 4 KiB reads.
func servedWith(t *testing.T, m *server.Metrics, writes, reads int) *server.Server {
	t.Helper()
	inst := testserver.Start(t, testserver.Options{Size: 1 << 20, Config: server.Config{Metrics: m}})
	c := inst.Dial(t, nil)
	ctx := context.Background()
	buf := make([]byte, 4096)
	for range writes {
		require.NoError(t, c.Write(ctx, buf, 0, 0))
	}
	for range reads {
		require.NoError(t, c.Read(ctx, buf, 0, 0))
	}
	return inst.Server
}

// Every collector follows Prometheus' naming and help conventions.
func TestCollectorsPassLint(t *testing.T) {
	var m server.Metrics
	srv := servedWith(t, &m, 1, 1)
	p, err := proxy.New(proxy.Config{Upstreams: []proxy.Upstream{{Network: "tcp", Address: "127.0.0.1:1"}}})
	require.NoError(t, err)
	for name, c := range map[string]prometheus.Collector{
		"server":    metrics.NewServerCollector(srv, &m),
		"migration": metrics.NewMigrationCollector(func() *mirror.Mirror { return nil }),
		"proxy":     metrics.NewProxyCollector(p),
	} {
		problems, err := testutil.CollectAndLint(c)
		require.NoError(t, err, name)
		assert.Empty(t, problems, name)
	}
}

// The latency histogram has the server's bounds, cumulative counts and
// one observation per request.
func TestLatencyHistogram(t *testing.T) {
	const writes, reads = 20, 5
	var m server.Metrics
	srv := servedWith(t, &m, writes, reads)
	reg, err := metrics.NewRegistry(metrics.NewServerCollector(srv, &m))
	require.NoError(t, err)
	fams, err := reg.Gather()
	require.NoError(t, err)
	want := map[string]uint64{"write": writes, "read": reads, "flush": 0}
	for _, fam := range fams {
		if fam.GetName() != "flexnbd_request_duration_seconds" {
			continue
		}
		for _, series := range fam.GetMetric() {
			cmd := series.GetLabel()[0].GetValue()
			h := series.GetHistogram()
			if n, ok := want[cmd]; ok {
				assert.Equal(t, n, h.GetSampleCount(), cmd)
				delete(want, cmd)
			}
			bs := h.GetBucket()
			require.Len(t, bs, len(server.LatencyBuckets), cmd)
			prev := uint64(0)
			for i, b := range bs {
				assert.Equal(t, server.LatencyBuckets[i].Seconds(), b.GetUpperBound(), cmd)
				assert.GreaterOrEqual(t, b.GetCumulativeCount(), prev, "%s: bucket %d", cmd, i)
				prev = b.GetCumulativeCount()
			}
			assert.LessOrEqual(t, prev, h.GetSampleCount(), cmd)
		}
	}
	assert.Empty(t, want, "commands without a histogram")
}
