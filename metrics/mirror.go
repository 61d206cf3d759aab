package metrics

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/flexnbd/flexnbd/mirror"
)

var (
	migratingDesc = prometheus.NewDesc("flexnbd_migration_active",
		"1 while a migration out of this instance runs, else 0.", nil, nil)
	sentDesc = prometheus.NewDesc("flexnbd_migration_sent_bytes",
		"Data the destination acknowledged in the current or last migration.", nil, nil)
	dirtyDesc = prometheus.NewDesc("flexnbd_migration_dirty_bytes",
		"Data the current migration has still to look at: dirty blocks, and in the first pass everything not yet reached.",
		nil, nil)
	passDesc = prometheus.NewDesc("flexnbd_migration_pass",
		"Pass over the export the current migration is in, or the last one ended in.", nil, nil)
	modeDesc = prometheus.NewDesc("flexnbd_migration_mode",
		"1 for the mode the running migration is in, 0 for the others.", []string{"mode"}, nil)
	freezeDesc = prometheus.NewDesc("flexnbd_migration_freeze_seconds",
		"How long clients were held in the last freeze of the current or last migration.", nil, nil)
	attemptsDesc = prometheus.NewDesc("flexnbd_migration_attempts",
		"Attempts made by the current or last migration; more than 1 after failed connections.", nil, nil)
	speedLimitDesc = prometheus.NewDesc("flexnbd_migration_speed_limit_bytes_per_second",
		"Speed limit of the running migration; 0 is none.", nil, nil)
)

var modes = [...]mirror.Mode{mirror.ModeCopy, mirror.ModeActive, mirror.ModeFreeze, mirror.ModeRetry}

// migrationCollector reads the status of the current or last migration
// at scrape time.
type migrationCollector struct {
	last func() *mirror.Mirror
}

// NewMigrationCollector exports the migration that last returns: the
// one in progress or the last one, nil before the first.
func NewMigrationCollector(last func() *mirror.Mirror) prometheus.Collector {
	return migrationCollector{last: last}
}

func (c migrationCollector) Describe(ch chan<- *prometheus.Desc) {
	describe(ch, migratingDesc, sentDesc, dirtyDesc, passDesc, modeDesc, freezeDesc, attemptsDesc, speedLimitDesc)
}

func (c migrationCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.last()
	if m == nil {
		ch <- gauge(migratingDesc, 0)
		return
	}
	st := m.Status()
	running := !st.Done
	ch <- gauge(migratingDesc, b2f(running))
	ch <- gauge(sentDesc, float64(st.BytesSent))
	ch <- gauge(dirtyDesc, float64(st.BytesLeft))
	ch <- gauge(passDesc, float64(st.Pass))
	for _, mode := range modes {
		ch <- gauge(modeDesc, b2f(running && st.Mode == mode), mode.String())
	}
	ch <- gauge(freezeDesc, st.LastFreeze.Seconds())
	ch <- gauge(attemptsDesc, float64(st.Attempts))
	limit := float64(st.SpeedLimit)
	if !running {
		limit = 0
	}
	ch <- gauge(speedLimitDesc, limit)
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
