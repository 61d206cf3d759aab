// Command soak runs `make soak`: a flexnbd serve under many clients that
// read, write, flush, trim and ask for block status, each checking what it
// reads against what it wrote, while the access list changes (dropping
// everyone for a moment) and migrations start and are broken off. It samples
// the server's memory and descriptors, verifies the file at the end, and
// prints a markdown report. It exits 1 when a check failed.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flexnbd/flexnbd/control"
	"github.com/flexnbd/flexnbd/nbd"
)

const blockSize = 4096

type options struct {
	bin      string
	dir      string
	duration time.Duration
	clients  int
	blocks   int // per client
}

func main() {
	var o options
	flag.StringVar(&o.bin, "bin", "bin/flexnbd", "the flexnbd binary")
	flag.StringVar(&o.dir, "dir", os.TempDir(), "where the files go")
	flag.DurationVar(&o.duration, "duration", 2*time.Minute, "how long to run")
	flag.IntVar(&o.clients, "clients", 64, "clients")
	flag.IntVar(&o.blocks, "blocks", 64, "4 KiB blocks each client owns")
	flag.Parse()
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(1)
	}
}

// stats are the counts the report gives.
type stats struct {
	ops, reads, writes, flushes, trims, statuses atomic.Int64
	reconnects, refused, mismatches, errors      atomic.Int64
	aclChanges, mirrorsStarted, mirrorsBroken    atomic.Int64
	mirrorsCompleted                             atomic.Int64
	errMu                                        sync.Mutex
	errSeen                                      map[string]int
}

func (st *stats) unexpected(err error) {
	st.errors.Add(1)
	st.errMu.Lock()
	if st.errSeen == nil {
		st.errSeen = map[string]int{}
	}
	st.errSeen[err.Error()]++
	st.errMu.Unlock()
}

// blockState is what a client knows of one of its blocks: the version it
// last wrote (0: zeroes, after a trim or never written).
type blockState struct {
	version uint64
	unsure  bool // a write or trim failed mid-way: either content may be there
	prev    uint64
}

func stamp(block int, v uint64) []byte {
	p := make([]byte, blockSize)
	for i := 0; i < blockSize; i += 16 {
		binary.LittleEndian.PutUint64(p[i:], uint64(block))
		binary.LittleEndian.PutUint64(p[i+8:], v)
	}
	return p
}

func content(block int, v uint64) []byte {
	if v == 0 {
		return make([]byte, blockSize)
	}
	return stamp(block, v)
}

func run(o options) error {
	dir, err := os.MkdirTemp(o.dir, "flexnbd-soak")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	size := int64(o.clients * o.blocks * blockSize)
	file := filepath.Join(dir, "disk.img")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		return err
	}
	if err := os.Truncate(file, size); err != nil {
		return err
	}
	sock := filepath.Join(dir, "ctl.sock")
	port := freePort()
	addr := "127.0.0.1:" + strconv.Itoa(port)
	serve := exec.Command(o.bin, "serve", "--addr", "127.0.0.1", "--port", strconv.Itoa(port), "--file", file,
		"--sock", sock, "-q")
	serve.Stderr = os.Stderr
	if err := serve.Start(); err != nil {
		return err
	}
	defer func() { _ = serve.Process.Kill(); _ = serve.Wait() }()
	if !waitFile(sock, 20*time.Second) {
		return fmt.Errorf("serve did not start")
	}

	var st stats
	ctx, cancel := context.WithTimeout(context.Background(), o.duration)
	defer cancel()
	states := make([][]blockState, o.clients)
	var wg sync.WaitGroup
	for w := range o.clients {
		states[w] = make([]blockState, o.blocks)
		wg.Go(func() { client(ctx, addr, w, o.blocks, states[w], &st) })
	}
	var samples []sample
	wg.Go(func() { samples = sampler(ctx, serve.Process.Pid) })
	wg.Go(func() { churn(ctx, o.bin, sock, dir, size, &st) })
	wg.Wait()

	// Every block must hold what its client last wrote.
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, blockSize)
	bad := 0
	for w, blocks := range states {
		for i, b := range blocks {
			block := w*o.blocks + i
			if _, err := f.ReadAt(buf, int64(block)*blockSize); err != nil {
				return err
			}
			if bytes.Equal(buf, content(block, b.version)) || b.unsure && bytes.Equal(buf, content(block, b.prev)) {
				continue
			}
			bad++
		}
	}
	report(o, &st, samples, bad)
	if bad > 0 || st.mismatches.Load() > 0 {
		return fmt.Errorf("%d blocks wrong at the end, %d reads wrong during the run", bad, st.mismatches.Load())
	}
	return nil
}

// client runs one client until ctx ends, reconnecting whenever it is
// dropped (by an access list change).
func client(ctx context.Context, addr string, w, blocks int, state []blockState, st *stats) {
	r := rand.New(rand.NewPCG(uint64(w), 1))
	var version uint64
	for ctx.Err() == nil {
		c, err := nbd.Dial(ctx, "tcp", addr, nil)
		if err != nil {
			st.refused.Add(1)
			sleep(ctx, 50*time.Millisecond)
			continue
		}
		st.reconnects.Add(1)
		for ctx.Err() == nil {
			i := r.IntN(blocks)
			block := w*blocks + i
			off := uint64(block) * blockSize
			s := &state[i]
			var err error
			switch n := r.IntN(100); {
			case n < 40:
				version++
				s.prev, s.version, s.unsure = s.version, version, true
				if err = c.Write(ctx, stamp(block, version), off, 0); err == nil {
					s.unsure = false
					st.writes.Add(1)
				}
			case n < 80:
				buf := make([]byte, blockSize)
				if err = c.Read(ctx, buf, off, 0); err == nil {
					st.reads.Add(1)
					if !s.unsure && !bytes.Equal(buf, content(block, s.version)) {
						st.mismatches.Add(1)
					}
				}
			case n < 90:
				if err = c.Flush(ctx); err == nil {
					st.flushes.Add(1)
				}
			case n < 95:
				s.prev, s.version, s.unsure = s.version, 0, true
				if err = c.WriteZeroes(ctx, off, blockSize, 0); err == nil {
					s.unsure = false
					st.trims.Add(1)
				}
			default:
				if _, err = c.BlockStatus(ctx, off, blockSize, 0); err == nil {
					st.statuses.Add(1)
				}
			}
			st.ops.Add(1)
			if err != nil {
				// Being dropped by the access list ends a connection
				// (EOF, reset, or ESHUTDOWN for what it sent as it
				// closed); anything else is counted.
				if ctx.Err() == nil && !dropped(err) {
					st.unexpected(err)
				}
				break
			}
		}
		c.Abort()
	}
}

func dropped(err error) bool {
	m := err.Error()
	return strings.Contains(m, "EOF") || strings.Contains(m, "reset") || strings.Contains(m, "closed") ||
		strings.Contains(m, "broken pipe") || strings.Contains(m, "ESHUTDOWN")
}

// churn changes the access list and starts and breaks migrations until
// ctx ends.
func churn(ctx context.Context, bin, sock, dir string, size int64, st *stats) {
	tick := time.NewTicker(3 * time.Second)
	defer tick.Stop()
	for round := 0; ; round++ {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if round%2 == 0 {
			// Nobody for a moment: every client is dropped, then let in.
			_ = exec.Command(bin, "acl", "--sock", sock, "127.0.0.2").Run()
			sleep(ctx, 300*time.Millisecond)
			_ = exec.Command(bin, "acl", "--sock", sock).Run()
			st.aclChanges.Add(2)
			continue
		}
		dst := filepath.Join(dir, "dst.img")
		_ = os.WriteFile(dst, nil, 0o644)
		_ = os.Truncate(dst, size)
		dport := freePort()
		listen := exec.Command(bin, "listen", "--addr", "127.0.0.1", "--port", strconv.Itoa(dport), "--file", dst, "-q")
		if listen.Start() != nil {
			continue
		}
		time.Sleep(200 * time.Millisecond)
		if round%4 == 1 {
			// Slow enough to be broken off.
			if exec.Command(bin, "mirror", "--sock", sock, "--addr", "127.0.0.1", "--port", strconv.Itoa(dport),
				"--max-speed", "500000").Run() == nil {
				st.mirrorsStarted.Add(1)
				sleep(ctx, time.Second)
				if exec.Command(bin, "break", "--sock", sock).Run() == nil {
					st.mirrorsBroken.Add(1)
				}
			}
		} else {
			// Completed, the source going on serving (a live copy).
			c := control.Client{Path: sock, Timeout: 60 * time.Second}
			r, err := c.Do(ctx, control.CmdMirrorWait, "127.0.0.1", strconv.Itoa(dport), "nothing")
			st.mirrorsStarted.Add(1)
			if err == nil && r.OK() {
				st.mirrorsCompleted.Add(1)
			}
		}
		_ = listen.Process.Kill()
		_ = listen.Wait()
	}
}

type sample struct {
	rssKiB  int64
	threads int64
	fds     int
}

func sampler(ctx context.Context, pid int) []sample {
	var out []sample
	for ctx.Err() == nil {
		out = append(out, sample{procStatus(pid, "VmRSS:"), procStatus(pid, "Threads:"), fds(pid)})
		sleep(ctx, time.Second)
	}
	return out
}

// procStatus reads one number from /proc/PID/status.
func procStatus(pid int, key string) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == key {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n
		}
	}
	return 0
}

func fds(pid int) int {
	es, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(es)
}

func report(o options, st *stats, samples []sample, bad int) {
	var maxRSS, lastRSS, maxThreads int64
	maxFds := 0
	for _, s := range samples {
		maxRSS = max(maxRSS, s.rssKiB)
		maxFds = max(maxFds, s.fds)
		maxThreads = max(maxThreads, s.threads)
		lastRSS = s.rssKiB
	}
	fmt.Printf("## flexnbd soak, %s\n\n", time.Now().UTC().Format("2006-01-02 15:04 UTC"))
	fmt.Printf("- %d clients for %s, each on its own %d blocks of 4 KiB\n", o.clients, o.duration, o.blocks)
	fmt.Printf("- operations: %d (reads %d, writes %d, flushes %d, write-zeroes %d, block status %d)\n",
		st.ops.Load(), st.reads.Load(), st.writes.Load(), st.flushes.Load(), st.trims.Load(), st.statuses.Load())
	fmt.Printf("- access list changes: %d (each dropping every client for 300 ms); connections made: %d, refused meanwhile: %d\n",
		st.aclChanges.Load(), st.reconnects.Load(), st.refused.Load())
	fmt.Printf("- migrations started: %d, broken off: %d, completed (the source serving on): %d\n",
		st.mirrorsStarted.Load(), st.mirrorsBroken.Load(), st.mirrorsCompleted.Load())
	fmt.Printf("- server, sampled every second: RSS max %d MiB (%d MiB at the end), descriptors max %d, threads max %d\n",
		maxRSS/1024, lastRSS/1024, maxFds, maxThreads)
	fmt.Printf("- reads that did not match the last write: %d; blocks wrong at the end: %d; unexpected errors: %d\n",
		st.mismatches.Load(), bad, st.errors.Load())
	for m, n := range st.errSeen {
		fmt.Printf("  - %dx %s\n", n, m)
	}
}

func sleep(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func waitFile(path string, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if _, err := os.Stat(path); err == nil {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

func freePort() int {
	l, err := (&net.ListenConfig{}).Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		return 0
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
