package mirror_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/mirror"
	"github.com/flexnbd/flexnbd/nbd"
	"github.com/flexnbd/flexnbd/server"
)

// FuzzMigrationStream sends whatever the fuzzer makes as the transmission
// phase of a migration source's session to a destination. Whatever comes,
// the destination must not panic or hang, and must not call the migration
// complete unless the stream, read by the protocol's rules, ended with a
// FLUSH followed by DISC: partial data must never take over from the
// source.
func FuzzMigrationStream(f *testing.F) {
	req := func(typ nbd.Cmd, cookie, off uint64, length uint32) []byte {
		return nbd.AppendRequest(nil, nbd.Request{Type: typ, Cookie: cookie, Offset: off, Length: length})
	}
	write := append(req(nbd.CmdWrite, 1, 4096, 512), make([]byte, 512)...)
	flush := req(nbd.CmdFlush, 2, 0, 0)
	disc := req(nbd.CmdDisc, 3, 0, 0)
	f.Add(concat(write, flush, disc))                           // complete
	f.Add(concat(write, disc))                                  // no flush: not complete
	f.Add(concat(write, flush, write, disc))                    // written after the flush
	f.Add(concat(flush, disc))                                  // flush only
	f.Add(concat(write, flush))                                 // no DISC
	f.Add(concat(write[:40], flush, disc))                      // payload swallows the rest
	f.Add(concat(req(nbd.CmdFlush, 2, 0, 9), disc))             // a malformed flush
	f.Add(concat(req(nbd.CmdRead, 4, 1<<40, 512), flush, disc)) // an out-of-range read first

	file := scratchFile(f)

	f.Fuzz(func(t *testing.T, stream []byte) {
		if sendAsSource(t, file, stream) && !endsWithFlushThenDisc(stream) {
			t.Fatalf("migration called complete after a stream that does not end with FLUSH, DISC: %x", stream)
		}
	})
}

// The harness itself: the stream a real source sends completes the
// migration, and one without its FLUSH does not.
func TestMigrationStreamHarness(t *testing.T) {
	file := scratchFile(t)
	write := append(nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdWrite, Cookie: 1, Length: 512}), make([]byte, 512)...)
	flush := nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdFlush, Cookie: 2})
	disc := nbd.AppendRequest(nil, nbd.Request{Type: nbd.CmdDisc, Cookie: 3})
	if !sendAsSource(t, file, concat(write, flush, disc)) {
		t.Fatal("write, flush, disc did not complete the migration")
	}
	if sendAsSource(t, file, concat(write, disc)) {
		t.Fatal("write, disc completed the migration")
	}
}

func scratchFile(t testing.TB) *server.File {
	path := filepath.Join(t.TempDir(), "dest.img")
	must(t, os.WriteFile(path, nil, 0o600))
	must(t, os.Truncate(path, 1<<20))
	file, err := server.OpenFile(path, false)
	must(t, err)
	t.Cleanup(func() { file.Close() })
	return file
}

// sendAsSource connects to a fresh destination serving file as its
// migration source, sends stream after the handshake, and reports whether
// the destination took the migration as complete once the session ended.
func sendAsSource(t *testing.T, file *server.File, stream []byte) bool {
	dest := &mirror.Destination{Logger: zerolog.Nop()}
	srv := server.New(server.Config{
		Backend: file, Sessions: dest, Logger: zerolog.Nop(),
		HandshakeTimeout: 5 * time.Second, PayloadTimeout: 5 * time.Second,
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	must(t, err)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		<-served
	}()

	nc, err := net.Dial("tcp", l.Addr().String())
	must(t, err)
	defer nc.Close()
	must(t, nc.SetDeadline(time.Now().Add(10*time.Second)))
	br := bufio.NewReader(nc)
	must(t, sourceHandshake(br, nc))
	// The server may close early (a bad magic): a failed write is one of
	// the outcomes, not an error of the test.
	_, _ = nc.Write(stream)
	_ = nc.(*net.TCPConn).CloseWrite()
	if _, err := io.Copy(io.Discard, br); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("the destination kept the connection")
	}
	// The session's end is reported just after the connection closes.
	deadline := time.Now().Add(5 * time.Second)
	for srv.NumClients() > 0 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	return dest.HasControl()
}

// endsWithFlushThenDisc parses stream as requests and tells whether the
// last two before DISC (or the stream's end) were FLUSH and DISC.
func endsWithFlushThenDisc(stream []byte) bool {
	var last nbd.Cmd = 0xffff
	for len(stream) >= nbd.RequestHeaderSize {
		r, err := nbd.DecodeRequest((*[nbd.RequestHeaderSize]byte)(stream[:nbd.RequestHeaderSize]))
		if err != nil {
			return false
		}
		stream = stream[nbd.RequestHeaderSize:]
		if r.Type == nbd.CmdDisc {
			return last == nbd.CmdFlush
		}
		if r.Type == nbd.CmdWrite {
			if uint64(len(stream)) < uint64(r.Length) {
				return false
			}
			stream = stream[r.Length:]
		}
		last = r.Type
	}
	return false
}

// sourceHandshake negotiates as a migration source: fixed newstyle, then
// NBD_OPT_GO for the source's export name, simple replies.
func sourceHandshake(br *bufio.Reader, w io.Writer) error {
	var greeting [18]byte
	if _, err := io.ReadFull(br, greeting[:]); err != nil {
		return err
	}
	msg := binary.BigEndian.AppendUint32(nil, uint32(nbd.FlagCFixedNewstyle|nbd.FlagCNoZeroes))
	data := binary.BigEndian.AppendUint32(nil, uint32(len(mirror.SourceExportName)))
	data = append(data, mirror.SourceExportName...)
	data = binary.BigEndian.AppendUint16(data, 0)
	msg = binary.BigEndian.AppendUint64(msg, 0x49484156454f5054) // IHAVEOPT
	msg = binary.BigEndian.AppendUint32(msg, uint32(nbd.OptGo))
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := w.Write(msg); err != nil {
		return err
	}
	for {
		var hdr [20]byte
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return err
		}
		if _, err := br.Discard(int(binary.BigEndian.Uint32(hdr[16:]))); err != nil {
			return err
		}
		switch typ := binary.BigEndian.Uint32(hdr[12:]); {
		case typ == 1: // NBD_REP_ACK
			return nil
		case typ&(1<<31) != 0:
			return &nbd.OptionError{Rep: nbd.Rep(typ)}
		}
	}
}

func concat(parts ...[]byte) []byte {
	var out []byte
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func must(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
