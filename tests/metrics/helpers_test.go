package metrics

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
)

// bin is the flexnbd command under test, built once by TestMain.
var bin string

// raceBuild is set by race_test.go in race-enabled test runs.
var raceBuild bool

func TestMain(m *testing.M) { testproc.Main(m, raceBuild, &bin) }

// toolTimeout bounds a client tool's run; nothing waits for it to pass.
const toolTimeout = time.Minute

// proc is a running flexnbd and the fields of the event that said it
// was ready.
type proc struct {
	*testproc.Proc
	ready map[string]any
}

// field is a string field of the ready event.
func (p *proc) field(t *testing.T, name string) string {
	t.Helper()
	v, ok := p.ready[name].(string)
	require.True(t, ok, "no string field %q in %v", name, p.ready)
	return v
}

// start runs flexnbd with args, logging JSON, and waits for the event
// whose message is ready.
func start(t *testing.T, ready string, args ...string) *proc {
	t.Helper()
	args = append(args, "-v", "--log-format", "json")
	p := testproc.Start(t, "", bin, args...)
	line, ok := p.Stderr.Line(`"message":"`+ready+`"`, p.Done(), testproc.Timeout)
	require.True(t, ok, "flexnbd never logged %q:\n%s", ready, p.Stderr.Text())
	fields := map[string]any{}
	require.NoError(t, json.Unmarshal([]byte(line), &fields), line)
	return &proc{Proc: p, ready: fields}
}

// image creates a sparse file of size bytes.
func image(t *testing.T, size int64) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(path, nil, 0o644))
	require.NoError(t, os.Truncate(path, size))
	return path
}

// scrape fetches http://addr/metrics and parses the text format.
func scrape(t *testing.T, addr string) map[string]*dto.MetricFamily {
	t.Helper()
	client := http.Client{Timeout: toolTimeout}
	resp, err := client.Get("http://" + addr + "/metrics")
	require.NoError(t, err)
	defer resp.Body.Close()
	require.Equal(t, http.StatusOK, resp.StatusCode)
	parser := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := parser.TextToMetricFamilies(resp.Body)
	require.NoError(t, err)
	return fams
}

// value is the value of the series of name with the given label pairs
// (name, value, name, value...): a counter's or a gauge's value, a
// histogram's count. The series must exist.
func value(t *testing.T, fams map[string]*dto.MetricFamily, name string, labels ...string) float64 {
	t.Helper()
	fam, ok := fams[name]
	require.True(t, ok, "no metric %s", name)
	for _, m := range fam.GetMetric() {
		if !hasLabels(m, labels) {
			continue
		}
		switch fam.GetType() {
		case dto.MetricType_COUNTER:
			return m.GetCounter().GetValue()
		case dto.MetricType_GAUGE:
			return m.GetGauge().GetValue()
		case dto.MetricType_HISTOGRAM:
			return float64(m.GetHistogram().GetSampleCount())
		}
		t.Fatalf("%s: unexpected type %v", name, fam.GetType())
	}
	t.Fatalf("no series %s{%s}", name, strings.Join(labels, ","))
	return 0
}

func hasLabels(m *dto.Metric, labels []string) bool {
	want := map[string]string{}
	for i := 0; i+1 < len(labels); i += 2 {
		want[labels[i]] = labels[i+1]
	}
	found := 0
	for _, l := range m.GetLabel() {
		if v, ok := want[l.GetName()]; ok {
			if v != l.GetValue() {
				return false
			}
			found++
		}
	}
	return found == len(want)
}

// waitMetric scrapes addr until cond holds for the value of the series.
func waitMetric(t *testing.T, addr, what string, cond func(float64) bool, name string, labels ...string) {
	t.Helper()
	deadline := time.Now().Add(testproc.Timeout)
	for {
		if cond(value(t, scrape(t, addr), name, labels...)) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func itoa(n int) string { return fmt.Sprint(n) }
