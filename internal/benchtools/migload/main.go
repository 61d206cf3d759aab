// Command migload is the client load of the migration benchmark
// (scripts/bench-migrate.sh, workload "stall"): it measures how long a
// client's write can take while the export it writes to migrates.
//
// Each of -conns connections writes 4 KiB blocks, one at a time, to
// random 4 KiB-aligned offsets of its own slice of the export, through the
// project's NBD client. When a write fails (the source closes its
// connections at the hand-off) the connection is replaced by one to the
// next address of -addrs (the source first, then the destination), dialled
// every -retry until it answers or -give-up has passed, and the same write
// is sent again. A write's latency runs from its first send to its
// acknowledgement, reconnection and replay included.
//
// SIGUSR1 starts the next phase: the benchmark sends one when the
// migration begins and one when it has ended, and the report gives the
// writes, the longest one and the p99 of each phase ("before", "during",
// "after"), a write counting in the phase it began in.
//
// It runs for -duration (0: until SIGTERM or SIGINT), then with -verify
// reads back every block it wrote and checks that it holds the last write
// acknowledged for it, and prints one JSON object on standard output:
// counts, latency percentiles, the longest write, and every write that
// failed for good. It exits 0 unless it could not start, whatever the
// numbers; the JSON says what went wrong.
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"os/signal"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/flexnbd/flexnbd/nbd"
)

const blockSize = 4096

// magic starts every block migload writes, so a read-back tells its
// blocks from anything else.
const magic = 0x6d69676c6f616431 // "migload1"

// phaseNames name the phases SIGUSR1 steps through.
var phaseNames = [...]string{"before", "during", "after"}

// phase is the index in phaseNames of the current phase.
var phase atomic.Int32

type options struct {
	addrs     []string
	conns     int
	duration  time.Duration
	retry     time.Duration
	giveUp    time.Duration
	timeout   time.Duration
	readyFile string
	verify    bool
	maxErrors int
}

func main() {
	var o options
	var addrs string
	flag.StringVar(&addrs, "addrs", "", "comma-separated host:port list: the source first, then the destination")
	flag.IntVar(&o.conns, "conns", 8, "connections, each writing one block at a time")
	flag.DurationVar(&o.duration, "duration", 0, "how long to write (0: until SIGTERM or SIGINT)")
	flag.DurationVar(&o.retry, "retry", time.Millisecond, "pause between dials of a server that refused")
	flag.DurationVar(&o.giveUp, "give-up", 10*time.Second, "how long to keep dialling before a write fails for good")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Second, "how long one send of a write may wait for its reply")
	flag.StringVar(&o.readyFile, "ready", "", "file to create once every connection has had a write acknowledged")
	flag.BoolVar(&o.verify, "verify", true, "read back every block written and check it holds the last acknowledged write")
	flag.IntVar(&o.maxErrors, "max-errors", 20, "failed writes listed in the report, at most")
	flag.Parse()
	o.addrs = strings.Split(addrs, ",")
	if addrs == "" || o.conns < 1 {
		fmt.Fprintln(os.Stderr, "migload: -addrs and a positive -conns are required")
		os.Exit(2)
	}
	rep, err := run(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "migload: %v\n", err)
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	_ = enc.Encode(rep)
}

// report is what migload prints. Times are in milliseconds.
type report struct {
	Conns      int     `json:"conns"`
	Seconds    float64 `json:"seconds"`
	Writes     int     `json:"writes"`
	Reconnects int     `json:"reconnects"`
	Replays    int     `json:"replays"`
	Errors     int     `json:"errors"`
	MaxMs      float64 `json:"max_ms"`
	P50Ms      float64 `json:"p50_ms"`
	P99Ms      float64 `json:"p99_ms"`
	P999Ms     float64 `json:"p999_ms"`
	// MaxReplayedMs is the longest write that was sent again after its
	// connection failed; MaxPlainMs the longest one answered at its first
	// send.
	MaxReplayedMs float64 `json:"max_replayed_ms"`
	MaxPlainMs    float64 `json:"max_plain_ms"`
	// A replayed write's latency splits into its wait on the first server
	// until the connection failed (ReplayHeldMs, the longest) and the
	// reconnection and replay after it (ReplayRecoverMs, the longest).
	ReplayHeldMs    float64 `json:"replay_held_ms"`
	ReplayRecoverMs float64 `json:"replay_recover_ms"`
	// MaxDialMs is the longest (re)connection, dials that were refused
	// included; DialFailures counts those, DialError quotes the first.
	MaxDialMs    float64 `json:"max_dial_ms"`
	DialFailures int     `json:"dial_failures"`
	DialError    string  `json:"dial_error,omitempty"`
	// MaxAt is when the longest write began, in seconds from the start.
	MaxAt        float64       `json:"max_at_s"`
	Phases       []phaseReport `json:"phases"`
	Verified     int           `json:"verified"`
	VerifyErrors int           `json:"verify_errors"`
	ErrorList    []string      `json:"error_list,omitempty"`
}

// phaseReport describes the writes that began in one phase.
type phaseReport struct {
	Name   string  `json:"name"`
	Writes int     `json:"writes"`
	MaxMs  float64 `json:"max_ms"`
	P99Ms  float64 `json:"p99_ms"`
	// MaxBegan is the wall-clock time the longest write began, in the
	// format of flexnbd's log, to find it there.
	MaxBegan string `json:"max_began"`
}

// worker is one connection's state; it is owned by its goroutine until
// run collects it.
type worker struct {
	id     int
	o      *options
	start  time.Time
	base   uint64 // first byte of this worker's slice
	blocks uint64 // blocks in the slice
	addr   int    // index in o.addrs of the current connection
	c      *nbd.Client
	buf    []byte
	rng    *rand.Rand
	seq    uint64
	// last maps a block's offset to the seq of its last acknowledged
	// write; a block whose last write failed is left out (its content is
	// undefined).
	last map[uint64]uint64

	lat          [len(phaseNames)][]time.Duration
	phaseMax     [len(phaseNames)]time.Duration
	phaseMaxAt   [len(phaseNames)]time.Time
	replayed     time.Duration
	dialMax      time.Duration // longest connect, refused dials included
	dialFailures int
	dialError    string        // the first dial that failed
	heldMax      time.Duration // of replayed writes: first send to connection failure
	recoverMax   time.Duration // of replayed writes: connection failure to acknowledgement
	plain        time.Duration
	maxLat       time.Duration
	maxAt        time.Duration
	reconnects   int
	replays      int
	failed       int      // writes that failed for good
	errs         []string // the first o.maxErrors of them
	verified     int
	verifyErrs   []string
}

func run(o options) (*report, error) {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if o.duration > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.duration)
		defer cancel()
	}
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer func() {
		signal.Stop(usr1)
		close(usr1)
	}()
	go func() {
		for range usr1 {
			if p := phase.Load(); int(p) < len(phaseNames)-1 {
				phase.Store(p + 1)
			}
		}
	}()
	start := time.Now()
	workers := make([]*worker, o.conns)
	var size uint64
	for i := range workers {
		w := &worker{
			id:    i,
			o:     &o,
			start: start,
			buf:   make([]byte, blockSize),
			rng:   rand.New(rand.NewPCG(uint64(start.UnixNano()), uint64(i))),
			last:  make(map[uint64]uint64),
		}
		// Random filler after the header, so the data is not compressible
		// or all alike; only the header changes from write to write.
		for j := 32; j < blockSize; j += 8 {
			binary.LittleEndian.PutUint64(w.buf[j:], w.rng.Uint64())
		}
		if err := w.connect(0); err != nil {
			return nil, fmt.Errorf("connection %d: %w", i, err)
		}
		if size == 0 {
			size = w.c.Size()
		}
		workers[i] = w
	}
	slice := size / uint64(o.conns) / blockSize * blockSize
	if slice < blockSize {
		return nil, fmt.Errorf("export of %d bytes too small for %d connections", size, o.conns)
	}
	var wg sync.WaitGroup
	var ready atomic.Int32
	for _, w := range workers {
		w.base = uint64(w.id) * slice
		w.blocks = slice / blockSize
		wg.Go(func() {
			w.loop(ctx, func() {
				if int(ready.Add(1)) == o.conns && o.readyFile != "" {
					_ = os.WriteFile(o.readyFile, nil, 0o644)
				}
			})
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	if o.verify {
		for _, w := range workers {
			wg.Go(w.verify)
		}
		wg.Wait()
	}
	for _, w := range workers {
		if w.c != nil {
			_ = w.c.Close()
		}
	}
	return summarise(o, workers, elapsed), nil
}

// connect replaces the connection by one to o.addrs[from] (the last
// address when from is past the end), dialled every o.retry until it
// answers or o.giveUp has passed: a migration destination refuses clients
// until the hand-off.
func (w *worker) connect(from int) error {
	if w.c != nil {
		_ = w.c.Close()
		w.c = nil
	}
	began := time.Now()
	deadline := began.Add(w.o.giveUp)
	idx := min(from, len(w.o.addrs)-1)
	var err error
	defer func() { w.dialMax = max(w.dialMax, time.Since(began)) }()
	for {
		dctx, cancel := context.WithTimeout(context.Background(), w.o.giveUp)
		var c *nbd.Client
		c, err = nbd.Dial(dctx, "tcp", w.o.addrs[idx], &nbd.ClientOptions{NoBlockStatus: true})
		cancel()
		if err == nil {
			w.c, w.addr = c, idx
			return nil
		}
		w.dialFailures++
		if w.dialError == "" {
			w.dialError = err.Error()
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no server answered within %v; last error: %w", w.o.giveUp, err)
		}
		time.Sleep(w.o.retry)
	}
}

// loop writes until ctx ends. The write that is under way when it does is
// finished, replays included.
func (w *worker) loop(ctx context.Context, firstDone func()) {
	first := true
	for ctx.Err() == nil {
		off := w.base + w.rng.Uint64N(w.blocks)*blockSize
		w.seq++
		binary.LittleEndian.PutUint64(w.buf[0:], magic)
		binary.LittleEndian.PutUint64(w.buf[8:], uint64(w.id))
		binary.LittleEndian.PutUint64(w.buf[16:], off)
		binary.LittleEndian.PutUint64(w.buf[24:], w.seq)
		began := time.Now()
		ph := phase.Load()
		failedAt, err := w.write(off)
		replayed := !failedAt.IsZero()
		d := time.Since(began)
		if err != nil {
			delete(w.last, off)
			w.failed++
			if len(w.errs) < w.o.maxErrors {
				w.errs = append(w.errs, fmt.Sprintf("conn %d: write at %d (began %.3fs): %v",
					w.id, off, began.Sub(w.start).Seconds(), err))
			}
			if w.c == nil {
				return // no server answers: nothing more to measure
			}
			continue
		}
		w.last[off] = w.seq
		w.lat[ph] = append(w.lat[ph], d)
		if d > w.phaseMax[ph] {
			w.phaseMax[ph], w.phaseMaxAt[ph] = d, began
		}
		if d > w.maxLat {
			w.maxLat, w.maxAt = d, began.Sub(w.start)
		}
		if replayed {
			w.replayed = max(w.replayed, d)
			w.heldMax = max(w.heldMax, failedAt.Sub(began))
			w.recoverMax = max(w.recoverMax, d-failedAt.Sub(began))
		} else {
			w.plain = max(w.plain, d)
		}
		if first {
			first = false
			firstDone()
		}
	}
}

// write sends the block in w.buf to off until one server acknowledges it,
// moving on to the next address when a connection fails. For a write
// that had to be sent again it returns when its first connection failed.
func (w *worker) write(off uint64) (failedAt time.Time, err error) {
	for {
		ctx, cancel := context.WithTimeout(context.Background(), w.o.timeout)
		err = w.c.Write(ctx, w.buf, off, 0)
		cancel()
		if err == nil {
			return failedAt, nil
		}
		if w.c.Err() == nil && !errors.Is(err, nbd.ESHUTDOWN) {
			// The server answered with an error and the connection
			// lives: sending the same write again would not help.
			return failedAt, fmt.Errorf("server refused the write: %w", err)
		}
		if failedAt.IsZero() {
			failedAt = time.Now()
			w.replays++
		}
		w.reconnects++
		if cerr := w.connect(w.addr + 1); cerr != nil {
			return failedAt, fmt.Errorf("after %v: %w", err, cerr)
		}
	}
}

// verify reads back every block this worker wrote and checks that it
// holds the last write acknowledged for it.
func (w *worker) verify() {
	if w.c == nil {
		return
	}
	buf := make([]byte, blockSize)
	ctx := context.Background()
	for off, seq := range w.last {
		rctx, cancel := context.WithTimeout(ctx, w.o.timeout)
		err := w.c.Read(rctx, buf, off, 0)
		cancel()
		if err != nil {
			w.verifyErrs = append(w.verifyErrs, fmt.Sprintf("conn %d: read back %d: %v", w.id, off, err))
			return
		}
		gotMagic := binary.LittleEndian.Uint64(buf[0:])
		gotOff := binary.LittleEndian.Uint64(buf[16:])
		gotSeq := binary.LittleEndian.Uint64(buf[24:])
		if gotMagic != magic || gotOff != off || gotSeq != seq {
			w.verifyErrs = append(w.verifyErrs, fmt.Sprintf(
				"conn %d: block %d holds write %d (magic %#x, offset %d), want write %d",
				w.id, off, gotSeq, gotMagic, gotOff, seq))
			continue
		}
		w.verified++
	}
}

func summarise(o options, workers []*worker, elapsed time.Duration) *report {
	r := &report{Conns: o.conns, Seconds: elapsed.Seconds()}
	var all []time.Duration
	var byPhase [len(phaseNames)][]time.Duration
	var phaseMax [len(phaseNames)]time.Duration
	var phaseMaxAt [len(phaseNames)]time.Time
	var maxAt time.Duration
	var maxLat, maxRep, maxPlain time.Duration
	for _, w := range workers {
		for i, l := range w.lat {
			all = append(all, l...)
			byPhase[i] = append(byPhase[i], l...)
			if w.phaseMax[i] > phaseMax[i] {
				phaseMax[i], phaseMaxAt[i] = w.phaseMax[i], w.phaseMaxAt[i]
			}
		}
		r.Reconnects += w.reconnects
		r.Replays += w.replays
		r.Errors += w.failed
		r.Verified += w.verified
		r.VerifyErrors += len(w.verifyErrs)
		for _, e := range append(w.errs, w.verifyErrs...) {
			if len(r.ErrorList) < o.maxErrors {
				r.ErrorList = append(r.ErrorList, e)
			}
		}
		if w.maxLat > maxLat {
			maxLat, maxAt = w.maxLat, w.maxAt
		}
		maxRep = max(maxRep, w.replayed)
		r.ReplayHeldMs = max(r.ReplayHeldMs, ms(w.heldMax))
		r.ReplayRecoverMs = max(r.ReplayRecoverMs, ms(w.recoverMax))
		r.MaxDialMs = max(r.MaxDialMs, ms(w.dialMax))
		r.DialFailures += w.dialFailures
		if r.DialError == "" {
			r.DialError = w.dialError
		}
		maxPlain = max(maxPlain, w.plain)
	}
	slices.Sort(all)
	r.Writes = len(all)
	r.MaxMs = ms(maxLat)
	r.MaxAt = maxAt.Seconds()
	r.MaxReplayedMs = ms(maxRep)
	r.MaxPlainMs = ms(maxPlain)
	r.P50Ms = ms(percentile(all, 0.50))
	r.P99Ms = ms(percentile(all, 0.99))
	r.P999Ms = ms(percentile(all, 0.999))
	for i, l := range byPhase {
		slices.Sort(l)
		p := phaseReport{Name: phaseNames[i], Writes: len(l), P99Ms: ms(percentile(l, 0.99))}
		if len(l) > 0 {
			p.MaxMs = ms(phaseMax[i])
			p.MaxBegan = phaseMaxAt[i].Format("15:04:05.000")
		}
		r.Phases = append(r.Phases, p)
	}
	return r
}

// percentile is the nearest-rank percentile of sorted d.
func percentile(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	i := int(float64(len(d))*p+0.999999) - 1
	return d[min(max(i, 0), len(d)-1)]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
