package mirror

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"

	"github.com/flexnbd/flexnbd/internal/localtcp"
	"github.com/flexnbd/flexnbd/nbd"
)

// SourceExportName is the export name a migration source asks a newstyle
// destination for. Until the hand-off a destination serves that name and
// refuses every other, so an ordinary client (a proxy trying its next
// upstream too early) is turned away in the handshake.
const SourceExportName = "flexnbd-migration-source"

// Why a migration could not start, as the C flexnbd words it. Start wraps
// one of them with the detail.
var (
	ErrConnect      = errors.New("Mirror failed to connect")
	ErrRejected     = errors.New("Mirror was rejected")
	ErrNoGreeting   = errors.New("Remote server failed to respond")
	ErrSizeMismatch = errors.New("Remote size does not match local size")
)

// completeMessage is how a destination that already completed a
// migration refuses a source: the hand-off it tries to confirm took place.
const completeMessage = "migration already complete"

// connect dials the destination and negotiates, classifying failures as
// the C flexnbd does.
func (m *Mirror) connect(ctx context.Context) (*nbd.Client, error) {
	d := net.Dialer{Timeout: m.cfg.GreetingTimeout}
	if m.cfg.Bind.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: m.cfg.Bind.AsSlice()}
	}
	nc, err := d.DialContext(ctx, "tcp", m.cfg.Target)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConnect, err)
	}
	if tc, ok := nc.(*net.TCPConn); ok && localtcp.IsLocal(tc) {
		// A destination on this host gains nothing from BBR's pacing and
		// loses throughput to it, as the server's local clients do.
		if algorithm, changed, err := localtcp.AvoidPacing(tc); err != nil {
			m.log.Debug().Err(err).Msg("cannot avoid pacing toward a local destination")
		} else if changed {
			m.log.Debug().Str("congestion", algorithm).Msg("local destination: pacing off")
		}
	}
	c, err := nbd.NewClient(nc, &nbd.ClientOptions{
		ExportName:       SourceExportName,
		HandshakeTimeout: m.cfg.GreetingTimeout,
		MaxInFlight:      m.cfg.Depth*2 + 8,
	})
	if err != nil {
		nc.Close()
		var oe *nbd.OptionError
		switch {
		case errors.Is(err, os.ErrDeadlineExceeded):
			return nil, fmt.Errorf("%w: %w", ErrNoGreeting, err)
		case errors.As(err, &oe) && oe.Message == completeMessage:
			return nil, errAlreadyComplete
		}
		// Refused in the handshake, or closed before or during it.
		return nil, fmt.Errorf("%w: %w", ErrRejected, err)
	}
	if c.Size() != m.cfg.Export.Size() {
		c.Abort() // a DISC would complete an oldstyle destination
		return nil, fmt.Errorf("%w: destination %d bytes, source %d", ErrSizeMismatch, c.Size(), m.cfg.Export.Size())
	}
	return c, nil
}

// errAlreadyComplete: the destination says a migration into it completed.
var errAlreadyComplete = errors.New("mirror: destination reports the migration complete")
