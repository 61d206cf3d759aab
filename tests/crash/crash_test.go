package crash

import (
	"context"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testproc"
	"github.com/flexnbd/flexnbd/nbd"
)

var (
	bin       string
	raceBuild bool
)

func TestMain(m *testing.M) { testproc.Main(m, raceBuild, &bin) }

const (
	blockSize = 4096
	writers   = 4
	blocks    = 256 // per writer, each writer its own
	kills     = 6
)

func stamp(block int, seq uint64) []byte {
	p := make([]byte, blockSize)
	for i := 0; i < blockSize; i += 16 {
		binary.LittleEndian.PutUint64(p[i:], uint64(block))
		binary.LittleEndian.PutUint64(p[i+8:], seq)
	}
	return p
}

// ledger is what the writers were told: per block, the last version
// acknowledged as durable (a FUA write, or a write followed by a FLUSH
// that succeeded) and the versions sent after it without such an answer.
type ledger struct {
	mu      sync.Mutex
	durable map[int]uint64
	unsure  map[int][]uint64
	acked   int
}

func (l *ledger) sent(block int, seq uint64) {
	l.mu.Lock()
	l.unsure[block] = append(l.unsure[block], seq)
	l.mu.Unlock()
}

func (l *ledger) durableNow(blocks []int, seqs []uint64) {
	l.mu.Lock()
	for i, b := range blocks {
		if seqs[i] > l.durable[b] {
			l.durable[b] = seqs[i]
		}
		u := l.unsure[b][:0]
		for _, s := range l.unsure[b] {
			if s > seqs[i] {
				u = append(u, s)
			}
		}
		l.unsure[b] = u
		l.acked++
	}
	l.mu.Unlock()
}

// write runs one writer until its connection breaks: FUA writes, and
// batches of plain writes sealed by a FLUSH, on its own blocks.
func write(ctx context.Context, addr string, w int, seq *uint64, l *ledger) {
	c, err := nbd.Dial(ctx, "tcp", addr, nil)
	if err != nil {
		return
	}
	defer c.Abort()
	r := rand.New(rand.NewPCG(uint64(w), *seq))
	for ctx.Err() == nil {
		if r.IntN(2) == 0 {
			b := w*blocks + r.IntN(blocks)
			*seq++
			l.sent(b, *seq)
			if c.Write(ctx, stamp(b, *seq), uint64(b)*blockSize, nbd.CmdFlagFUA) != nil {
				return
			}
			l.durableNow([]int{b}, []uint64{*seq})
			continue
		}
		var bs []int
		var ss []uint64
		for range 1 + r.IntN(8) {
			b := w*blocks + r.IntN(blocks)
			*seq++
			l.sent(b, *seq)
			if c.Write(ctx, stamp(b, *seq), uint64(b)*blockSize, 0) != nil {
				return
			}
			bs, ss = append(bs, b), append(ss, *seq)
		}
		if c.Flush(ctx) != nil {
			return
		}
		l.durableNow(bs, ss)
	}
}

// SIGKILL during FUA writes and FLUSHes from several connections: every
// write acknowledged as durable is in the file afterwards, in that
// version or in a later one that was sent (and may have landed) before
// the kill.
func TestKilledServerKeepsAcknowledgedWrites(t *testing.T) {
	file := filepath.Join(t.TempDir(), "disk.img")
	require.NoError(t, os.WriteFile(file, nil, 0o644))
	require.NoError(t, os.Truncate(file, writers*blocks*blockSize))
	l := &ledger{durable: map[int]uint64{}, unsure: map[int][]uint64{}}
	seqs := make([]uint64, writers)
	for round := range kills {
		port := testproc.FreePort(t)
		p := testproc.Start(t, "", bin, "serve", "--addr", "127.0.0.1", "--port", testproc.Itoa(port),
			"--file", file, "-v")
		p.Stderr.WaitFor(t, "serving")
		addr := fmt.Sprintf("127.0.0.1:%d", port)
		ctx, cancel := context.WithTimeout(context.Background(), testproc.Timeout)
		var wg sync.WaitGroup
		for w := range writers {
			wg.Go(func() { write(ctx, addr, w, &seqs[w], l) })
		}
		time.Sleep(time.Duration(100+50*round) * time.Millisecond)
		p.Signal(t, 9)
		p.Wait(t)
		wg.Wait()
		cancel()
		verify(t, file, l)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	require.Positive(t, l.acked, "writes were acknowledged between the kills")
}

func verify(t *testing.T, file string, l *ledger) {
	t.Helper()
	f, err := os.Open(file)
	require.NoError(t, err)
	defer f.Close()
	l.mu.Lock()
	defer l.mu.Unlock()
	buf := make([]byte, blockSize)
	for b, want := range l.durable {
		_, err := f.ReadAt(buf, int64(b)*blockSize)
		require.NoError(t, err)
		got := binary.LittleEndian.Uint64(buf[8:])
		ok := got == want
		for _, s := range l.unsure[b] {
			ok = ok || got == s
		}
		require.True(t, ok, "block %d holds version %d; acknowledged as durable: %d, sent since: %v",
			b, got, want, l.unsure[b])
		require.Equal(t, stamp(b, got), buf, "block %d is whole", b)
		// What stands now is the base for the next round.
		l.durable[b] = got
		l.unsure[b] = nil
	}
}
