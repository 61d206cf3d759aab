//go:build linux

package iobench

import (
	"bytes"
	"io"
	"testing"

	"golang.org/x/sys/unix"
)

// TestZeroCopyAliasing shows the hazard of zero-copy reads: the reply is
// "sent" (the syscall has returned), then a later WRITE changes the same
// block, and only then does the peer read the reply. With a copying send
// (pread + write) the peer must see the old data. With sendfile or splice
// the socket may still hold references to the page-cache pages, so the
// peer can see the newer data. That outcome depends on the kernel and on
// timing, so it is logged, not asserted.
func TestZeroCopyAliasing(t *testing.T) {
	const size = 1 << 20
	for _, m := range readMethods[1:] {
		t.Run(m.name, func(t *testing.T) {
			f := makeDataFile(t, t.TempDir(), size)
			mapping := mmapFile(t, f, size, unix.PROT_READ)
			server, client := tcpPair(t)
			defer server.Close()
			defer client.Close()
			e := newReadEnv(t, f, mapping, server, 4096)
			old := make([]byte, 4096)
			if _, err := f.ReadAt(old, 0); err != nil {
				t.Fatal(err)
			}
			// The peer does not read yet, so the reply stays queued.
			if err := m.fn(e, 0, 4096); err != nil {
				t.Fatal(err)
			}
			newer := bytes.Repeat([]byte{0xAB}, 4096)
			if err := pwriteFull(fileFd(f), newer, 0); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, replyHeaderLen+4096)
			if _, err := io.ReadFull(client, got); err != nil {
				t.Fatal(err)
			}
			switch data := got[replyHeaderLen:]; {
			case bytes.Equal(data, old):
				t.Logf("%s: reply carries the data as of the read", m.name)
			case bytes.Equal(data, newer):
				if m.name == "PreadWritev" || m.name == "PreadOneWrite" {
					t.Fatalf("%s: copying send returned data written after the reply was sent", m.name)
				}
				t.Logf("%s: reply carries data WRITTEN AFTER the reply was sent", m.name)
			default:
				t.Logf("%s: reply carries a mix of old and new data", m.name)
			}
		})
	}
}
