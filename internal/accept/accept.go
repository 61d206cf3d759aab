// Package accept is the accept loop the NBD server and the control socket
// share: it rides out failures that pass (descriptor exhaustion, aborted
// connections) with a capped backoff instead of ending the service.
package accept

import (
	"errors"
	"net"
	"time"

	"github.com/rs/zerolog"
)

// Loop calls handle, on the calling goroutine, for every connection l
// accepts. It returns nil once closing reports true (the owner closed l on
// purpose), or the error that broke l otherwise.
func Loop(l net.Listener, closing func() bool, log zerolog.Logger, handle func(net.Conn)) error {
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err == nil {
			backoff = 0
			handle(nc)
			continue
		}
		if closing() {
			return nil
		}
		if !passing(err) {
			return err
		}
		backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
		log.Warn().Err(err).Str("listener", l.Addr().String()).Dur("retry_in", backoff).Msg("accept failed")
		time.Sleep(backoff)
	}
}

// passing reports whether an accept error leaves the listener usable:
// EMFILE, ENFILE, ECONNABORTED and timeouts.
func passing(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var te interface{ Temporary() bool }
	return errors.As(err, &te) && te.Temporary()
}
