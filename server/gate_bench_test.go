package server_test

import (
	"bufio"
	"io"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// gateSlot scatters request i over 2^28 distinct 4 KiB slots: the
// multiplier is odd, so no two of the spans in flight overlap and the
// benchmark measures finding conflicts, not waiting on them.
func gateSlot(i uint64) uint64 { return (i * 0x9E3779B97F4A7C15 & (1<<28 - 1)) << 12 }

// BenchmarkGateRegister is one admission with n requests in flight, a
// quarter of them writes: register a request, release the oldest one.
func BenchmarkGateRegister(b *testing.B) {
	for _, n := range []int{100, 1000, 10000} {
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			var g server.OrderGate
			ring := make([]server.GateSpan, n)
			register := func(i uint64) server.GateSpan {
				off := gateSlot(i)
				return g.Register(off, off+4096, i%4 == 0)
			}
			for i := range ring {
				ring[i] = register(uint64(i))
			}
			b.ReportAllocs()
			i := uint64(n)
			for b.Loop() {
				old := &ring[i%uint64(n)]
				g.Release(*old)
				*old = register(i)
				i++
			}
		})
	}
}

// BenchmarkManyConnectionsInFlight keeps 10,000 requests in flight across
// 1,000 connections, the way a fleet of clients would when one write is
// stuck on a failing disk: each connection has 5 reads parked behind that
// write and 5 more requests (reads and writes elsewhere, 4 KiB each)
// pipelined that do complete. Every one of those registers with a gate
// already holding over 5,000 spans. It reports completed requests per second.
func BenchmarkManyConnectionsInFlight(b *testing.B) {
	const conns, parked, active = 1000, 5, 5
	be := wrapFile(b)
	st := newStall(b, 0, 4096)
	be.write = func(p []byte, off uint64, fua bool) error {
		if st.covers(off, len(p)) {
			st.hold()
		}
		return be.Backend.WriteAt(p, off, fua)
	}
	inst := testserver.Start(b, testserver.Options{Config: server.Config{Backend: be}})
	st.releaseBeforeShutdown(b)
	block := make([]byte, 4096)

	stuck := dialRaw(b, inst.Addr)
	if err := stuck.send(nbd.Request{Type: nbd.CmdWrite, Length: 4096}, block); err != nil {
		b.Fatal(err)
	}
	st.awaitEntered(b, 1)

	// Cookies from parkedCookie up are the parked reads; the low bit of the
	// others tells a read, whose reply carries data; lastCookie marks the
	// end of a connection's requests.
	const parkedCookie, lastCookie = 1 << 62, 3
	rcs := make([]*rawConn, conns)
	for i := range rcs {
		rcs[i] = dialRaw(b, inst.Addr)
		for range parked {
			if err := rcs[i].send(nbd.Request{Type: nbd.CmdRead, Cookie: parkedCookie, Length: 4096}, nil); err != nil {
				b.Fatal(err)
			}
		}
	}
	waitFor(b, "every parked read registered", func() bool { return inst.Server.GatePending() == 1+conns*parked })

	var remaining atomic.Int64
	remaining.Store(int64(b.N))
	var wg sync.WaitGroup
	b.ResetTimer()
	for ci, rc := range rcs {
		slots := make(chan struct{}, active)
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(ci), 9))
			w := bufio.NewWriter(rc.nc)
			var hdr []byte
			send := func(req nbd.Request) bool {
				select {
				case slots <- struct{}{}:
				default:
					// Every slot taken: push out what is queued, then wait.
					if err := w.Flush(); err != nil {
						b.Error(err)
						return false
					}
					slots <- struct{}{}
				}
				hdr = nbd.AppendRequest(hdr[:0], req)
				w.Write(hdr)
				if req.Type == nbd.CmdWrite {
					w.Write(block)
				}
				return true
			}
			for remaining.Add(-1) >= 0 {
				req := nbd.Request{Type: nbd.CmdRead, Cookie: 1, Length: 4096,
					Offset: 4096 * (1 + rng.Uint64N(exportSize/4096-1))}
				if rng.IntN(10) == 0 {
					req.Type, req.Cookie = nbd.CmdWrite, 0
				}
				if !send(req) {
					return
				}
			}
			if send(nbd.Request{Type: nbd.CmdRead, Cookie: lastCookie, Offset: 4096, Length: 4096}) {
				if err := w.Flush(); err != nil {
					b.Error(err)
				}
			}
		})
		wg.Go(func() {
			data := make([]byte, 4096)
			for {
				h, err := rc.reply()
				if err != nil {
					b.Error(err)
					return
				}
				if h.Errno != 0 || h.Cookie >= parkedCookie {
					b.Errorf("unexpected reply %+v", h)
					return
				}
				if h.Cookie&1 == 1 {
					if _, err := io.ReadFull(rc.br, data); err != nil {
						b.Error(err)
						return
					}
				}
				<-slots
				if h.Cookie == lastCookie {
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "req/s")
	st.Release()
	for _, rc := range append(rcs, stuck) {
		rc.nc.(*net.TCPConn).Close()
	}
}
