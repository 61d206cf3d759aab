package testserver

import (
	"bytes"
	"context"
	"encoding/binary"
	"math/rand/v2"
	"os"
	"sync"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/nbd"
)

// Stamper writes sequence-stamped 4 KiB blocks from several connections,
// each to its own blocks and one write at a time, and remembers the last
// acknowledged version of every block: after a migration every one of
// them must be on the destination, and no version that was not
// acknowledged may be.
type Stamper struct {
	// Blocks is how many 4 KiB blocks each connection writes to.
	Blocks  int
	mu      sync.Mutex
	acked   map[int]uint64 // block -> sequence acknowledged last
	pending map[int]uint64 // block -> sequence sent, not answered
	// maybe holds the write each writer had in flight when it was told
	// to stop: it may or may not have run.
	maybe  map[int]uint64
	writes int
	errs   int
}

func Stamp(block int, seq uint64) []byte {
	p := make([]byte, 4096)
	for i := 0; i < len(p); i += 16 {
		binary.LittleEndian.PutUint64(p[i:], uint64(block))
		binary.LittleEndian.PutUint64(p[i+8:], seq)
	}
	return p
}

// Run writes from conns connections to addr until ctx ends or the server
// drops them; base is the first block. It returns once every writer
// stopped.
func (s *Stamper) Run(ctx context.Context, t testing.TB, addr string, conns, base int) {
	s.mu.Lock()
	if s.acked == nil {
		s.acked, s.pending, s.maybe = map[int]uint64{}, map[int]uint64{}, map[int]uint64{}
	}
	s.mu.Unlock()
	var wg sync.WaitGroup
	for w := range conns {
		wg.Go(func() {
			c, err := nbd.Dial(ctx, "tcp", addr, nil)
			if err != nil {
				t.Errorf("writer %d: %v", w, err)
				return
			}
			defer c.Close()
			r := rand.New(rand.NewPCG(uint64(w), 7))
			for seq := uint64(1); ctx.Err() == nil; seq++ {
				block := base + w*s.Blocks + r.IntN(s.Blocks)
				s.mu.Lock()
				s.pending[block] = seq
				s.mu.Unlock()
				err := c.Write(ctx, Stamp(block, seq), uint64(block)*4096, 0)
				s.mu.Lock()
				if err != nil {
					if ctx.Err() != nil {
						s.maybe[block] = seq
						delete(s.pending, block)
					} else {
						s.errs++
					}
					s.mu.Unlock()
					return
				}
				delete(s.pending, block)
				s.acked[block] = seq
				s.writes++
				s.mu.Unlock()
			}
		})
	}
	wg.Wait()
}

// Verify checks every block a writer touched in the file at path.
func (s *Stamper) Verify(t testing.TB, path string) {
	t.Helper()
	f, err := os.Open(path)
	require.NoError(t, err)
	defer f.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	buf := make([]byte, 4096)
	for block, seq := range s.acked {
		_, err := f.ReadAt(buf, int64(block)*4096)
		require.NoError(t, err)
		got := binary.LittleEndian.Uint64(buf[8:])
		if p, ok := s.maybe[block]; ok && got == p && bytes.Equal(buf, Stamp(block, got)) {
			continue
		}
		if got != seq || !bytes.Equal(buf, Stamp(block, got)) {
			if p, ok := s.pending[block]; ok && got == p {
				t.Errorf("block %d holds version %d, which was never acknowledged (acknowledged: %d)", block, got, seq)
				continue
			}
			t.Errorf("block %d holds version %d, want the acknowledged %d", block, got, seq)
		}
	}
}

// Writes counts the acknowledged writes.
func (s *Stamper) Writes() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.writes
}

// Errs counts the writes that failed while the writers were to go on (a
// server dropping them), not those cut short by the end of Run's context.
func (s *Stamper) Errs() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.errs
}
