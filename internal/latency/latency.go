// Package latency compares a good client's latency under attack with its
// latency just before, as a ratio of medians, for the hostile-peer tests:
// they assert that an attack costs others no more than a small factor
// without asserting any absolute time.
package latency

import (
	"slices"
	"testing"
	"time"
)

const (
	// MaxSlowdown is how much slower the median may be under attack.
	// The defects these tests guard against cost seconds or hang; a busy
	// CI machine costs a small factor.
	MaxSlowdown = 3.0
	// Samples per median.
	Samples = 101
	// Attempts is how many medians Keeps takes before it fails.
	Attempts = 5
)

// Median runs op Samples times and returns the median duration; op's
// first error fails the test.
func Median(t testing.TB, op func() error) time.Duration {
	t.Helper()
	d := make([]time.Duration, Samples)
	for i := range d {
		start := time.Now()
		if err := op(); err != nil {
			t.Fatalf("sample %d: %v", i, err)
		}
		d[i] = time.Since(start)
	}
	slices.Sort(d)
	return d[len(d)/2]
}

// Keeps measures op under attack against before, its median without the
// attack, and fails the test when it is over MaxSlowdown times as slow. A
// slow measurement is taken again, up to Attempts times in all and a
// second apart: a noisy machine is slow now and then (in `go test ./...`
// other packages' tests run beside this one, sometimes for seconds), a
// defect every time.
func Keeps(t testing.TB, before time.Duration, op func() error) {
	t.Helper()
	var ratios []float64
	for i := range Attempts {
		if i > 0 {
			time.Sleep(time.Second)
		}
		under := Median(t, op)
		ratio := float64(under) / float64(max(before, time.Microsecond))
		if ratio <= MaxSlowdown {
			t.Logf("median %v under attack, %v before: %.2fx", under, before, ratio)
			return
		}
		ratios = append(ratios, ratio)
	}
	t.Fatalf("median latency %.1fx as long under attack (%.1f on retries) as the %v before",
		ratios[0], ratios[1:], before)
}
