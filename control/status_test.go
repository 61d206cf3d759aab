package control_test

import (
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/control"
)

// TestStatusFieldOrder: scripts written for the C flexnbd read its fields
// first and in its order; ours follow.
func TestStatusFieldOrder(t *testing.T) {
	cFields := []string{"pid", "size", "is_mirroring", "clients_allowed", "num_clients", "has_control"}
	migration := []string{"migration_speed", "migration_duration", "migration_seconds_left", "migration_bytes_left"}
	ours := []string{"migration_pass", "migration_mode", "migration_attempts", "migration_bytes_sent"}
	extras := []string{"uptime", "bytes_read", "bytes_written", "requests", "errors", "connections_seen", "connections_rejected"}
	cat := func(parts ...[]string) []string {
		var out []string
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	tests := []struct {
		name      string
		mirroring bool
		limit     uint64
		want      []string
	}{
		{name: "idle", limit: control.NoSpeedLimit, want: cat(cFields, extras)},
		{name: "mirroring", mirroring: true, limit: control.NoSpeedLimit, want: cat(cFields, migration, ours, extras)},
		{name: "mirroring with a limit", mirroring: true, limit: 1 << 20,
			want: cat(cFields, migration, []string{"migration_speed_limit"}, ours, extras)},
		{name: "a limit without a mirror is not shown", limit: 1 << 20, want: cat(cFields, extras)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := control.StatusInfo{IsMirroring: tt.mirroring, Migration: control.MigrationStatus{SpeedLimit: tt.limit}}
			var keys []string
			for _, f := range st.Fields() {
				keys = append(keys, f.Key)
			}
			require.Equal(t, tt.want, keys)
		})
	}
}

func TestStatusValues(t *testing.T) {
	st := control.StatusInfo{
		PID: 7, Size: 1 << 40, IsMirroring: true, ClientsAllowed: false, NumClients: 2, HasControl: true,
		Migration: control.MigrationStatus{
			BytesPerSecond: 5, Duration: 2500 * time.Millisecond, SecondsLeft: 3, BytesLeft: 15, SpeedLimit: 9,
			Pass: 3, Mode: "active", Attempts: 2, BytesSent: 99,
		},
		LastFreeze: 12 * time.Millisecond,
		Uptime:     61*time.Second + 999*time.Millisecond, BytesRead: 1, BytesWritten: 2, Requests: 3, Errors: 4,
		ConnectionsSeen: 5, ConnectionsRejected: 6,
	}
	require.Equal(t,
		"pid=7 size=1099511627776 is_mirroring=true clients_allowed=false num_clients=2 has_control=true "+
			"migration_speed=5 migration_duration=2 migration_seconds_left=3 migration_bytes_left=15 migration_speed_limit=9 "+
			"migration_pass=3 migration_mode=active migration_attempts=2 migration_bytes_sent=99 migration_last_freeze_ms=12 "+
			"uptime=61 bytes_read=1 bytes_written=2 requests=3 errors=4 connections_seen=5 connections_rejected=6 ",
		control.FormatFields(st.Fields()))
}

func TestParseFields(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want []control.Field
		bad  bool
	}{
		{name: "C status line with its trailing space", in: "pid=1 size=512 is_mirroring=false ",
			want: []control.Field{{"pid", "1"}, {"size", "512"}, {"is_mirroring", "false"}}},
		{name: "empty value", in: "acl= pid=1", want: []control.Field{{"acl", ""}, {"pid", "1"}}},
		{name: "equals sign in a value", in: "k=a=b", want: []control.Field{{"k", "a=b"}}},
		{name: "empty", in: "", want: []control.Field{}},
		{name: "word without a value", in: "pid=1 garbage", bad: true},
		{name: "empty key", in: "=1", bad: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := control.ParseFields(tt.in)
			if tt.bad {
				require.Error(t, err)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.want, got)
		})
	}
}

// TestFieldsJSON: one object, keys in status order, typed values.
func TestFieldsJSON(t *testing.T) {
	tests := []struct {
		name  string
		value string
		json  string
	}{
		{name: "true", value: "true", json: `true`},
		{name: "false", value: "false", json: `false`},
		{name: "zero", value: "0", json: `0`},
		{name: "largest uint64 stays exact", value: "18446744073709551615", json: `18446744073709551615`},
		{name: "negative", value: "-3", json: `-3`},
		{name: "fraction", value: "1.5", json: `1.5`},
		{name: "leading zero is not a JSON number", value: "007", json: `"007"`},
		{name: "word", value: "B/s", json: `"B/s"`},
		{name: "empty", value: "", json: `""`},
		{name: "quote escaped", value: `a"b`, json: `"a\"b"`},
		{name: "capitalised boolean is a string", value: "True", json: `"True"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := control.FieldsJSON([]control.Field{{"k", tt.value}})
			require.Equal(t, `{"k":`+tt.json+`}`, string(got))
			require.True(t, json.Valid(got))
		})
	}

	t.Run("whole status", func(t *testing.T) {
		st := control.StatusInfo{PID: 12, Size: 4096, ClientsAllowed: true, NumClients: 1, HasControl: true, Uptime: time.Minute}
		fields, err := control.ParseFields(control.FormatFields(st.Fields()))
		require.NoError(t, err)
		out := control.FieldsJSON(fields)
		dec := json.NewDecoder(strings.NewReader(string(out)))
		dec.UseNumber()
		var m map[string]any
		require.NoError(t, dec.Decode(&m))
		require.Equal(t, json.Number("12"), m["pid"])
		require.Equal(t, json.Number("4096"), m["size"])
		require.Equal(t, false, m["is_mirroring"])
		require.Equal(t, true, m["clients_allowed"])
		require.Equal(t, json.Number("60"), m["uptime"])
		require.Len(t, m, len(st.Fields()))
		require.True(t, strings.HasPrefix(string(out), `{"pid":12,"size":4096,"is_mirroring":false,`), string(out))
	})
}

// A proxy's status line names its upstreams and how its clients fared.
func TestProxyStatus(t *testing.T) {
	st := control.StatusInfo{PID: 9, Uptime: 5 * time.Second, Proxy: &control.ProxyStatus{
		InUse: "10.0.0.2:10809", Upstreams: []string{"10.0.0.2:10809", "10.0.0.1:10809"},
		Clients: 3, Connected: 2, Reconnects: 4, Replayed: 17, Failed: 1, CacheHits: 5, LongestOutage: 1500 * time.Millisecond,
	}}
	require.Equal(t, "pid=9 upstream=10.0.0.2:10809 upstreams=10.0.0.2:10809,10.0.0.1:10809 clients=3 connected=2 "+
		"reconnects=4 replayed=17 failed_requests=1 cache_hits=5 longest_outage_ms=1500 uptime=5 ", control.FormatFields(st.Fields()))
	st.Proxy = &control.ProxyStatus{Upstreams: []string{"/run/nbd.sock"}}
	require.Contains(t, control.FormatFields(st.Fields()), "upstream=none upstreams=/run/nbd.sock ")
}

// The version comes last, after the C fields and this implementation's,
// for a server and a proxy alike, and stays a string in JSON even when it
// looks like a number.
func TestStatusVersion(t *testing.T) {
	server := control.StatusInfo{PID: 3, Size: 512, Version: "1.0"}
	fields := server.Fields()
	require.Equal(t, control.Field{Key: "version", Value: "1.0"}, fields[len(fields)-1])
	require.True(t, strings.HasSuffix(string(control.FieldsJSON(fields)), `"connections_rejected":0,"version":"1.0"}`))

	proxy := control.StatusInfo{PID: 3, Version: "v2.1.0-3-gabc", Proxy: &control.ProxyStatus{}}
	require.True(t, strings.HasSuffix(control.FormatFields(proxy.Fields()), " uptime=0 version=v2.1.0-3-gabc "))

	server.Version = ""
	require.NotContains(t, control.FormatFields(server.Fields()), "version")
}
