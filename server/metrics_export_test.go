package server

import (
	"time"

	"github.com/flexnbd/flexnbd/nbd"
)

// ObserveForTest counts one request as the reply writer does.
func (m *Metrics) ObserveForTest(cmd nbd.Cmd, length uint32, errno nbd.Errno, d time.Duration) {
	m.observe(cmd, length, errno, d)
}
