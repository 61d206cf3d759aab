package interop

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/nbd"
)

// TestManyClients has a hundred of our clients and a few qemu-io
// processes connected at once, each writing its own region with several
// requests in flight and verifying it, while the others do the same. At
// the end every region holds exactly what its owner wrote.
func TestManyClients(t *testing.T) {
	const (
		clients   = 100
		region    = 512 << 10
		piece     = 64 << 10
		qemuProcs = 4
		qemuBase  = 56 << 20 // qemu-io regions come after the clients'
		qemuLen   = 1 << 20
	)
	inst := testserver.Start(t, testserver.Options{Size: 64 << 20})
	qemu := testserver.Tool(t, "qemu-io")
	data := randomBytes(t, clients*region)

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	errs := make(chan error, clients+qemuProcs)
	var wg sync.WaitGroup
	for i := 0; i < clients; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- oneClient(ctx, inst.Addr, uint64(i*region), data[i*region:(i+1)*region], piece)
		}()
	}
	for i := 0; i < qemuProcs; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off := qemuBase + i*qemuLen
			pat := 0xc0 + i
			out, err := testserver.RunErr(t, toolTimeout, qemu, "-f", "raw", "-t", "writeback",
				"-c", fmt.Sprintf("aio_write -P %#x %d %d", pat, off, qemuLen/2),
				"-c", fmt.Sprintf("aio_write -P %#x %d %d", pat, off+qemuLen/2, qemuLen/2),
				"-c", "aio_flush",
				"-c", fmt.Sprintf("read -P %#x %d %d", pat, off, qemuLen),
				inst.URI())
			if err == nil && bytes.Contains([]byte(out), []byte("failed")) {
				err = fmt.Errorf("verification failed")
			}
			if err != nil {
				err = fmt.Errorf("qemu-io %d: %w\n%s", i, err, out)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		assert.NoError(t, err)
	}
	if t.Failed() {
		return
	}

	requireSame(t, data, readRange(t, inst.Path, 0, clients*region), "client regions in the file")
	for i := 0; i < qemuProcs; i++ {
		requireSame(t, bytes.Repeat([]byte{byte(0xc0 + i)}, qemuLen),
			readRange(t, inst.Path, int64(qemuBase+i*qemuLen), qemuLen), fmt.Sprintf("qemu-io region %d", i))
	}
	assert.Equal(t, uint64(0), inst.Server.Stats().Errors)
	require.GreaterOrEqual(t, inst.Server.Stats().ConnectionsSeen, uint64(clients+qemuProcs))
}

// oneClient writes want at off in pieces sent together, flushes, reads it
// back in pieces sent together and compares.
func oneClient(ctx context.Context, addr string, off uint64, want []byte, piece int) error {
	c, err := nbd.Dial(ctx, "tcp", addr, nil)
	if err != nil {
		return err
	}
	defer c.Close()
	got := make([]byte, len(want))
	for _, read := range []bool{false, true} {
		var wg sync.WaitGroup
		errs := make(chan error, len(want)/piece+1)
		for p := 0; p < len(want); p += piece {
			wg.Add(1)
			go func() {
				defer wg.Done()
				end := min(p+piece, len(want))
				if read {
					errs <- c.Read(ctx, got[p:end], off+uint64(p), 0)
				} else {
					errs <- c.Write(ctx, want[p:end], off+uint64(p), 0)
				}
			}()
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				return fmt.Errorf("client at %d: %w", off, err)
			}
		}
		if !read {
			if err := c.Flush(ctx); err != nil {
				return fmt.Errorf("client at %d: flush: %w", off, err)
			}
		}
	}
	if !bytes.Equal(want, got) {
		return fmt.Errorf("client at %d read back different data", off)
	}
	return nil
}
