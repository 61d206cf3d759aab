package server_test

import (
	"bytes"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// Every refused request must leave the connection usable: a client that
// gets an error back carries on, and a server that lost track of a write
// payload would read garbage as the next request header.
func TestRefusedRequestsKeepConnectionUsable(t *testing.T) {
	const size = exportSize
	const maxPayload = nbd.DefaultMaxPayload
	tests := []struct {
		name    string
		req     nbd.Request
		payload int       // bytes of WRITE payload sent after the header
		want    nbd.Errno // on newstyle sessions
		wantOld nbd.Errno // on oldstyle sessions, if different
		modes   []mode    // nil: every mode
	}{
		{name: "read past end", req: nbd.Request{Type: nbd.CmdRead, Offset: size, Length: 512},
			want: nbd.EINVAL, wantOld: nbd.ENOSPC},
		{name: "read straddling end", req: nbd.Request{Type: nbd.CmdRead, Offset: size - 512, Length: 1024},
			want: nbd.EINVAL, wantOld: nbd.ENOSPC},
		{name: "write past end", req: nbd.Request{Type: nbd.CmdWrite, Offset: size, Length: 4096},
			payload: 4096, want: nbd.ENOSPC},
		{name: "write straddling end", req: nbd.Request{Type: nbd.CmdWrite, Offset: size - 1, Length: 2},
			payload: 2, want: nbd.ENOSPC},
		{name: "write zeroes past end", req: nbd.Request{Type: nbd.CmdWriteZeroes, Offset: size - 4096, Length: 8192},
			want: nbd.ENOSPC},
		{name: "trim past end", req: nbd.Request{Type: nbd.CmdTrim, Offset: size, Length: 4096},
			want: nbd.EINVAL, wantOld: nbd.ENOSPC},
		{name: "cache past end", req: nbd.Request{Type: nbd.CmdCache, Offset: size + 1, Length: 1},
			want: nbd.EINVAL, wantOld: nbd.ENOSPC},
		{name: "block status past end", req: nbd.Request{Type: nbd.CmdBlockStatus, Offset: size, Length: 4096},
			want: nbd.EINVAL, modes: []mode{structuredMode}},
		{name: "read offset overflows", req: nbd.Request{Type: nbd.CmdRead, Offset: math.MaxUint64 - 511, Length: 1024},
			want: nbd.EINVAL, wantOld: nbd.ENOSPC},
		{name: "write offset overflows", req: nbd.Request{Type: nbd.CmdWrite, Offset: math.MaxUint64 - 511, Length: 1024},
			payload: 1024, want: nbd.ENOSPC},
		{name: "trim offset overflows", req: nbd.Request{Type: nbd.CmdTrim, Offset: math.MaxUint64, Length: 1},
			want: nbd.EINVAL, wantOld: nbd.ENOSPC},
		{name: "unknown command", req: nbd.Request{Type: 99, Length: 512}, want: nbd.EINVAL},
		{name: "resize is not supported", req: nbd.Request{Type: nbd.CmdResize, Offset: size}, want: nbd.EINVAL},
		{name: "unknown flag on read", req: nbd.Request{Type: nbd.CmdRead, Flags: 1 << 9, Length: 512},
			want: nbd.EINVAL},
		{name: "unknown flag on write", req: nbd.Request{Type: nbd.CmdWrite, Flags: 1 << 15, Length: 512},
			payload: 512, want: nbd.EINVAL},
		{name: "no-hole flag on write", req: nbd.Request{Type: nbd.CmdWrite, Flags: nbd.CmdFlagNoHole, Length: 512},
			payload: 512, want: nbd.EINVAL},
		{name: "req-one flag on read", req: nbd.Request{Type: nbd.CmdRead, Flags: nbd.CmdFlagReqOne, Length: 512},
			want: nbd.EINVAL},
		{name: "fast-zero flag on trim", req: nbd.Request{Type: nbd.CmdTrim, Flags: nbd.CmdFlagFastZero, Length: 512},
			want: nbd.EINVAL},
		{name: "df without structured replies", req: nbd.Request{Type: nbd.CmdRead, Flags: nbd.CmdFlagDF, Length: 512},
			want: nbd.EINVAL, modes: []mode{simpleMode, oldstyleMode}},
		{name: "read over 32 MiB", req: nbd.Request{Type: nbd.CmdRead, Length: maxPayload + 1},
			want: nbd.EINVAL},
		{name: "write over 32 MiB", req: nbd.Request{Type: nbd.CmdWrite, Length: maxPayload + 1},
			payload: maxPayload + 1, want: nbd.EINVAL, modes: []mode{structuredMode, simpleMode}},
		{name: "block status without negotiated context", req: nbd.Request{Type: nbd.CmdBlockStatus, Length: 4096},
			want: nbd.EINVAL, modes: []mode{simpleMode, oldstyleMode}},
		{name: "block status of nothing", req: nbd.Request{Type: nbd.CmdBlockStatus, Length: 0},
			want: nbd.EINVAL, modes: []mode{structuredMode}},
	}
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			inst := m.start(t, testserver.Options{})
			c := m.dial(t, inst)
			refused := 0
			for i, tt := range tests {
				if tt.modes != nil && !containsMode(tt.modes, m) {
					continue
				}
				refused++
				t.Run(tt.name, func(t *testing.T) {
					want := tt.want
					if m.oldstyle && tt.wantOld != 0 {
						want = tt.wantOld
					}
					var payload, readBuf []byte
					if tt.payload > 0 {
						payload = bytes.Repeat([]byte{0xee}, tt.payload)
					}
					if tt.req.Type == nbd.CmdRead {
						readBuf = make([]byte, tt.req.Length)
					}
					_, err := c.Do(testCtx(t), tt.req, payload, readBuf)
					require.ErrorIs(t, err, want)
					require.NoError(t, c.Err(), "the connection must survive a refused request")
					roundTrip(t, c, uint64(1+i)<<20, uint64(i))
				})
			}
			// Nothing refused was written: the payload bytes (0xee) never
			// reached the export.
			head := make([]byte, 4096)
			require.NoError(t, c.Read(testCtx(t), head, 0, 0))
			assert.Equal(t, make([]byte, 4096), head)
			tail := make([]byte, 4096)
			require.NoError(t, c.Read(testCtx(t), tail, size-4096, 0))
			assert.Equal(t, make([]byte, 4096), tail)

			st := inst.Server.Stats()
			assert.EqualValues(t, refused, st.Errors, "each refused request counts as one error")
			assert.Zero(t, inst.Server.GatePending(), "refused requests must not hold ranges")
		})
	}
}

func containsMode(ms []mode, m mode) bool {
	for _, x := range ms {
		if x.name == m.name {
			return true
		}
	}
	return false
}

// A client that did not select base:allocation gets EINVAL for
// BLOCK_STATUS even with structured replies on.
func TestBlockStatusNeedsNegotiatedContext(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{})
	c := inst.Dial(t, &nbd.ClientOptions{NoBlockStatus: true})
	require.True(t, c.Session().Structured)
	require.Zero(t, c.Session().AllocationContext)
	_, err := c.Do(testCtx(t), nbd.Request{Type: nbd.CmdBlockStatus, Length: 4096}, nil, nil)
	require.ErrorIs(t, err, nbd.EINVAL)
	roundTrip(t, c, 0, 1)
}

// A read-only export refuses every change with EPERM and keeps the
// connection; WRITE payloads are consumed.
func TestReadOnlyExportRefusesChanges(t *testing.T) {
	tests := []struct {
		name    string
		req     nbd.Request
		payload int
	}{
		{"write", nbd.Request{Type: nbd.CmdWrite, Offset: 4096, Length: 4096}, 4096},
		{"write with fua", nbd.Request{Type: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Offset: 0, Length: 100}, 100},
		{"trim", nbd.Request{Type: nbd.CmdTrim, Offset: 0, Length: 4096}, 0},
		{"write zeroes", nbd.Request{Type: nbd.CmdWriteZeroes, Offset: 0, Length: 4096}, 0},
		{"write zeroes no hole", nbd.Request{Type: nbd.CmdWriteZeroes, Flags: nbd.CmdFlagNoHole, Length: 4096}, 0},
	}
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			path := newSparseFile(t, exportSize)
			seed := pattern(7, 8192)
			require.NoError(t, writeFileAt(path, seed, 0))
			inst := m.start(t, testserver.Options{Path: path, Config: server.Config{ReadOnly: true}})
			c := m.dial(t, inst)
			require.NotZero(t, c.Flags()&nbd.FlagReadOnly, "the export must announce itself read-only")
			for _, tt := range tests {
				t.Run(tt.name, func(t *testing.T) {
					ctx := testCtx(t)
					_, err := c.Do(ctx, tt.req, make([]byte, tt.payload), nil)
					require.ErrorIs(t, err, nbd.EPERM)
					got := make([]byte, len(seed))
					require.NoError(t, c.Read(ctx, got, 0, 0), "a read must follow the refusal")
					require.Equal(t, seed, got, "a refused change altered the export")
				})
			}
		})
	}
}

// A request with a bad magic cannot be resynchronised: that connection
// closes, and other clients of the export do not notice.
func TestBadRequestMagicClosesOnlyThatConnection(t *testing.T) {
	for _, m := range allModes {
		t.Run(m.name, func(t *testing.T) {
			inst := m.start(t, testserver.Options{})
			bystander := m.dial(t, inst)

			nc, err := net.Dial("tcp", inst.Addr)
			require.NoError(t, err)
			victim, err := nbd.NewClient(nc, &nbd.ClientOptions{NoStructuredReplies: m.simple})
			require.NoError(t, err)
			defer victim.Close()
			waitFor(t, "both clients to be counted", func() bool { return inst.Server.NumClients() == 2 })

			garbage := nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdRead, Length: 512})
			garbage[0] ^= 0xff
			_, err = nc.Write(garbage)
			require.NoError(t, err)

			waitFor(t, "the server to close the connection", func() bool { return victim.Err() != nil })
			err = victim.Read(testCtx(t), make([]byte, 512), 0, 0)
			require.Error(t, err, "a request on the closed connection must fail")
			waitFor(t, "the client count to drop", func() bool { return inst.Server.NumClients() == 1 })
			roundTrip(t, bystander, 0, 3)
		})
	}
}

// The C flexnbd accepts writes over 32 MiB and its fleet's clients send
// them, so oldstyle sessions take them too, in pieces, as one write.
func TestOldstyleAcceptsWritesOver32MiB(t *testing.T) {
	var mu sync.Mutex
	var changed [][2]uint64
	var syncs atomic.Int32
	be := wrapFile(t)
	be.sync = func() error {
		// Counted, not done: flushing 32 MiB to disk would only slow the test.
		syncs.Add(1)
		return nil
	}
	inst := oldstyleMode.start(t, testserver.Options{Config: server.Config{Backend: be, OnWrite: func(off, length uint64) {
		mu.Lock()
		changed = append(changed, [2]uint64{off, length})
		mu.Unlock()
	}}})
	c := oldstyleMode.dial(t, inst)
	ctx := testCtx(t)
	const off, length = 513, nbd.DefaultMaxPayload + 5000
	want := pattern(1, length)
	// One request, as a C client sends it (Client.Write would split it).
	_, err := c.Do(ctx, nbd.Request{Type: nbd.CmdWrite, Flags: nbd.CmdFlagFUA, Offset: off, Length: length}, want, nil)
	require.NoError(t, err)
	mu.Lock()
	assert.Equal(t, [][2]uint64{{off, length}}, changed, "one write, reported whole")
	mu.Unlock()
	assert.EqualValues(t, 1, syncs.Load(), "FUA on a streamed write syncs once, at the end")

	got := make([]byte, length)
	const half = length / 2
	require.NoError(t, c.Read(ctx, got[:half], off, 0))
	require.NoError(t, c.Read(ctx, got[half:], off+half, 0))
	require.True(t, bytes.Equal(want, got), "a streamed write must land whole")
	roundTrip(t, c, 48<<20, 2)
}
