package control

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// StatusInfo is what the status command reports.
type StatusInfo struct {
	// The C flexnbd's fields, in its order.
	PID            int
	Size           uint64
	IsMirroring    bool
	ClientsAllowed bool
	NumClients     int
	HasControl     bool
	// Migration is reported only while IsMirroring.
	Migration MigrationStatus

	// Fields of this implementation, reported after the C ones.
	// LastFreeze is how long clients were held by the last completed
	// migration (shown when one completed and the server kept serving).
	LastFreeze          time.Duration
	Uptime              time.Duration
	BytesRead           uint64
	BytesWritten        uint64
	Requests            uint64
	Errors              uint64
	ConnectionsSeen     uint64
	ConnectionsRejected uint64
	// Version is the running binary's version, the last field when set.
	Version string

	// Proxy, when set, is a proxy's status: the line then carries pid,
	// these fields and uptime instead of a server's.
	Proxy *ProxyStatus
}

// ProxyStatus describes a proxy.
type ProxyStatus struct {
	// InUse is the upstream the latest connection reached ("" before
	// any); Upstreams the list tried, in order.
	InUse     string
	Upstreams []string
	// Clients are the downstream connections, Connected those whose
	// upstream connection is up.
	Clients, Connected int
	Reconnects         uint64
	// Replayed counts requests sent again after a reconnection; Failed
	// those answered EIO after --max-outage.
	Replayed, Failed uint64
	// CacheHits counts READs answered from the read-ahead.
	CacheHits     uint64
	LongestOutage time.Duration
}

// MigrationStatus describes a running migration.
type MigrationStatus struct {
	// BytesPerSecond is the recent copy rate.
	BytesPerSecond uint64
	// Duration is the time since the migration started.
	Duration    time.Duration
	SecondsLeft uint64
	BytesLeft   uint64
	// SpeedLimit is in bytes per second; NoSpeedLimit leaves it out of
	// the status line, as the C flexnbd does.
	SpeedLimit uint64

	// This implementation's own, reported after the C fields.
	Pass      int
	Mode      string // copy, active or freeze
	Attempts  int
	BytesSent uint64
}

// Field is one key=value pair of a status line.
type Field struct {
	Key, Value string
}

// Fields lists s as the status line carries it, in order.
func (s StatusInfo) Fields() []Field {
	u := func(v uint64) string { return strconv.FormatUint(v, 10) }
	b := strconv.FormatBool
	if p := s.Proxy; p != nil {
		inUse := p.InUse
		if inUse == "" {
			inUse = "none"
		}
		return s.withVersion([]Field{
			{"pid", strconv.Itoa(s.PID)},
			{"upstream", inUse},
			{"upstreams", strings.Join(p.Upstreams, ",")},
			{"clients", strconv.Itoa(p.Clients)},
			{"connected", strconv.Itoa(p.Connected)},
			{"reconnects", u(p.Reconnects)},
			{"replayed", u(p.Replayed)},
			{"failed_requests", u(p.Failed)},
			{"cache_hits", u(p.CacheHits)},
			{"longest_outage_ms", u(uint64(p.LongestOutage / time.Millisecond))},
			{"uptime", u(uint64(s.Uptime / time.Second))},
		})
	}
	f := []Field{
		{"pid", strconv.Itoa(s.PID)},
		{"size", u(s.Size)},
		{"is_mirroring", b(s.IsMirroring)},
		{"clients_allowed", b(s.ClientsAllowed)},
		{"num_clients", strconv.Itoa(s.NumClients)},
		{"has_control", b(s.HasControl)},
	}
	if s.IsMirroring {
		m := s.Migration
		f = append(f,
			Field{"migration_speed", u(m.BytesPerSecond)},
			Field{"migration_duration", u(uint64(m.Duration / time.Second))},
			Field{"migration_seconds_left", u(m.SecondsLeft)},
			Field{"migration_bytes_left", u(m.BytesLeft)},
		)
		if m.SpeedLimit != NoSpeedLimit {
			f = append(f, Field{"migration_speed_limit", u(m.SpeedLimit)})
		}
		f = append(f,
			Field{"migration_pass", strconv.Itoa(m.Pass)},
			Field{"migration_mode", m.Mode},
			Field{"migration_attempts", strconv.Itoa(m.Attempts)},
			Field{"migration_bytes_sent", u(m.BytesSent)},
		)
	}
	if s.LastFreeze > 0 {
		f = append(f, Field{"migration_last_freeze_ms", u(uint64(s.LastFreeze / time.Millisecond))})
	}
	return s.withVersion(append(f,
		Field{"uptime", u(uint64(s.Uptime / time.Second))},
		Field{"bytes_read", u(s.BytesRead)},
		Field{"bytes_written", u(s.BytesWritten)},
		Field{"requests", u(s.Requests)},
		Field{"errors", u(s.Errors)},
		Field{"connections_seen", u(s.ConnectionsSeen)},
		Field{"connections_rejected", u(s.ConnectionsRejected)},
	))
}

// withVersion ends f with the version, when there is one: last, so that
// parsers of the C flexnbd's fields, which come first, are not disturbed.
func (s StatusInfo) withVersion(f []Field) []Field {
	if s.Version == "" {
		return f
	}
	return append(f, Field{"version", s.Version})
}

// FormatFields renders fields as the status message: each key=value
// followed by a space, the trailing one included, exactly as the C flexnbd
// writes them.
func FormatFields(fields []Field) string {
	var sb strings.Builder
	for _, f := range fields {
		sb.WriteString(f.Key)
		sb.WriteByte('=')
		sb.WriteString(f.Value)
		sb.WriteByte(' ')
	}
	return sb.String()
}

// ParseFields splits a status message into its fields, in order.
func ParseFields(msg string) ([]Field, error) {
	words := strings.Fields(msg)
	fields := make([]Field, 0, len(words))
	for _, w := range words {
		k, v, ok := strings.Cut(w, "=")
		if !ok || k == "" {
			return nil, fmt.Errorf("control: status field %q is not key=value", w)
		}
		fields = append(fields, Field{k, v})
	}
	return fields, nil
}

// jsonNumber matches the decimal numbers that JSON accepts as they are.
var jsonNumber = regexp.MustCompile(`^-?(0|[1-9][0-9]*)(\.[0-9]+)?$`)

// FieldsJSON encodes fields as one JSON object with the same keys in the
// same order. Values are typed by their text, which works for any server's
// status line, this one's or the C flexnbd's: true and false become
// booleans, decimal numbers become numbers (exact, however large), and
// anything else stays a string. The version is always a string, even when
// it looks like a number (1.0).
func FieldsJSON(fields []Field) []byte {
	out := []byte{'{'}
	for i, f := range fields {
		if i > 0 {
			out = append(out, ',')
		}
		key, _ := json.Marshal(f.Key) // strings always encode
		out = append(out, key...)
		out = append(out, ':')
		switch {
		case f.Key == "version":
			val, _ := json.Marshal(f.Value)
			out = append(out, val...)
		case f.Value == "true" || f.Value == "false" || jsonNumber.MatchString(f.Value):
			out = append(out, f.Value...)
		default:
			val, _ := json.Marshal(f.Value)
			out = append(out, val...)
		}
	}
	return append(out, '}')
}
