package main

import (
	"os"
	"path/filepath"

	"github.com/rs/zerolog"
)

// handedOffMarker is the file a serve leaves in its systemd runtime
// directory after handing its export off. The unit's ExecStopPost= looks
// for it to stop the socket unit: otherwise the next connection would
// start the service again on the stale image.
const handedOffMarker = "handed-off"

// markHandedOff writes the marker when systemd gave the process a
// runtime directory (RuntimeDirectory= sets RUNTIME_DIRECTORY); elsewhere
// there is nobody to tell. A failure is logged, not fatal: the export
// has already moved.
func markHandedOff(log zerolog.Logger) {
	dir := os.Getenv("RUNTIME_DIRECTORY")
	if dir == "" {
		return
	}
	// systemd separates several runtime directories with colons; the
	// first is the instance's own.
	dir = filepath.SplitList(dir)[0]
	path := filepath.Join(dir, handedOffMarker)
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		log.Error().Err(err).Str("path", path).Msg("hand-off marker not written")
		return
	}
	log.Info().Str("path", path).Msg("hand-off marker written")
}
