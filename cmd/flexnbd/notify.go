package main

import (
	"fmt"
	"os"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"github.com/dustin/go-humanize"
	"github.com/rs/zerolog"
)

// The service manager hears from flexnbd through sd_notify when it runs it
// with NOTIFY_SOCKET set (Type=notify); without it every call here does
// nothing.

// notify sends one state; a manager that cannot be told is logged, not
// fatal, since serving matters more than being watched.
func notify(log zerolog.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn().Err(err).Str("state", state).Msg("sd_notify failed")
	}
}

// notifyReady says that clients can connect and the control socket
// answers.
func notifyReady(log zerolog.Logger) { notify(log, daemon.SdNotifyReady) }

// notifyStopping says that a shutdown began.
func notifyStopping(log zerolog.Logger) { notify(log, daemon.SdNotifyStopping) }

// statusInterval is how often a migration's progress reaches the manager.
const statusInterval = 2 * time.Second

// watchStatus keeps the manager's STATUS= line (systemctl status) on what
// inst does: serving, waiting for or receiving a migration, or migrating
// out with its pass and progress. It returns a function that stops it.
func watchStatus(inst *instance) (stop func()) {
	if os.Getenv("NOTIFY_SOCKET") == "" {
		return func() {}
	}
	done := make(chan struct{})
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		t := time.NewTicker(statusInterval)
		defer t.Stop()
		last := ""
		for {
			if s := instanceStatus(inst); s != last {
				notify(inst.log, "STATUS="+s)
				last = s
			}
			select {
			case <-done:
				return
			case <-t.C:
			}
		}
	}()
	return func() { close(done); <-finished }
}

// instanceStatus words what inst is doing in one line.
func instanceStatus(inst *instance) string {
	st := inst.srv.Stats()
	if m := inst.running(); m != nil {
		ms := m.Status()
		size := inst.srv.Size()
		percent := uint64(100)
		if size > 0 && ms.BytesLeft < size {
			percent = (size - ms.BytesLeft) * 100 / size
		} else if size > 0 {
			percent = 0
		}
		// People read this line: sizes with units, as size_human.
		return fmt.Sprintf("migrating to %s: pass %d, %d%% done, %s left", ms.Target, ms.Pass, percent, humanize.IBytes(ms.BytesLeft))
	}
	if inst.dest != nil && !inst.dest.HasControl() {
		if st.Clients > 0 {
			return fmt.Sprintf("receiving a migration: %s written", humanize.IBytes(st.BytesWritten))
		}
		return "waiting for a migration"
	}
	return fmt.Sprintf("serving %d clients", st.Clients)
}
