package mirror

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"strconv"
	"time"

	"github.com/rs/zerolog"

	"github.com/flexnbd/flexnbd/server"
)

// Export is the source of a migration: the served export as the mirror
// sees it. *server.Server and its backend together provide it.
type Export interface {
	// Size is the export size in bytes.
	Size() uint64
	// ReadAt fills p from off.
	ReadAt(p []byte, off uint64) error
	// Extents calls fn with consecutive data and hole runs covering
	// [off, off+length) until fn returns false.
	Extents(off, length uint64, fn func(off, length uint64, hole bool) bool) error
	// SetWriteHook installs fn to be called after every change to the
	// export, failed ones included, before the change is acknowledged and
	// before an overlapping change can start; nil removes it.
	SetWriteHook(fn func(off, length uint64))
	// Hold stops new requests and returns once the running ones have
	// finished; Resume runs the held requests, DropHeld abandons them and
	// closes their connections.
	Hold(ctx context.Context) error
	Resume()
	DropHeld()
}

// FileExport is an Export whose data lives in a file the kernel can send
// from directly: the copy then uses sendfile(2) rather than a read into a
// buffer and a write from it. SourceFile returns nil when it cannot.
type FileExport interface {
	Export
	SourceFile() *os.File
}

// Finish is what the source does once the destination has taken over.
type Finish int

const (
	// FinishExit abandons the held requests (their clients send them to
	// the destination) so the caller can close the server and exit.
	FinishExit Finish = iota
	// FinishUnlink does the same and removes the source file after the
	// destination acknowledged its final FLUSH and before DISC, so
	// exactly one copy is canonical at any moment.
	FinishUnlink
	// FinishNothing resumes serving: the destination is a live copy.
	FinishNothing
)

// Config describes one migration. Export and Target are required.
type Config struct {
	Export Export
	// Target is the destination's host:port.
	Target string
	// Bind is the local address to connect from; the zero Addr lets the
	// system choose.
	Bind   netip.Addr
	Finish Finish
	// Unlink removes the source file; FinishUnlink requires it.
	Unlink func() error
	// MaxBytesPerSecond limits what the copy sends; 0 is no limit. The
	// freeze's final copy is never limited.
	MaxBytesPerSecond uint64
	// RequestTimeout fails an attempt whose request the destination has
	// not answered in time. Default: FLEXNBD_MS_REQUEST_LIMIT_SECS, else
	// 60 s, as the C flexnbd.
	RequestTimeout time.Duration
	// GreetingTimeout bounds the destination's handshake. Default 5 s.
	GreetingTimeout time.Duration
	// RetryMin and RetryMax bound the exponential backoff between
	// attempts. Default 1 s and 30 s.
	RetryMin, RetryMax time.Duration
	// FreezeTarget is how long the final copy may take at the measured
	// speed: the freeze begins once what is dirty fits in it. Default 5 ms.
	FreezeTarget time.Duration
	// HoldTimeout bounds the wait for running client requests when the
	// freeze begins; past it the freeze is put off. Default 2 s.
	HoldTimeout time.Duration

	// Tuning, chosen by measurement (docs/BENCHMARKS.md); zero values
	// take the defaults below.
	ChunkSize   uint64 // bytes per WRITE; default DefaultChunkSize
	Depth       int    // WRITEs in flight; default DefaultDepth
	Granularity uint64 // bytes per dirty bit; default DefaultGranularity
	// NoSendFile makes the copy read into buffers even where the export
	// offers its file (benchmarks compare the two).
	NoSendFile bool

	Logger zerolog.Logger
}

// Defaults for the tuning fields.
const (
	DefaultChunkSize   = 1 << 20
	DefaultDepth       = 8
	DefaultGranularity = 16 << 10
)

// RequestLimitEnv overrides the default request timeout, in seconds
// (a float), as in the C flexnbd.
const RequestLimitEnv = "FLEXNBD_MS_REQUEST_LIMIT_SECS"

func (c *Config) setDefaults() error {
	if c.Export == nil || c.Target == "" {
		return errors.New("mirror: Export and Target are required")
	}
	if c.Finish == FinishUnlink && c.Unlink == nil {
		return errors.New("mirror: FinishUnlink needs Unlink")
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = 60 * time.Second
		if v := os.Getenv(RequestLimitEnv); v != "" {
			secs, err := strconv.ParseFloat(v, 64)
			// A week is far beyond any sane limit, and keeps the
			// conversion to a Duration from overflowing.
			if err != nil || !(secs > 0 && secs <= 7*24*3600) {
				return errors.New("mirror: " + RequestLimitEnv + " must be a number of seconds between 0 and a week")
			}
			c.RequestTimeout = time.Duration(secs * float64(time.Second))
		}
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	def(&c.GreetingTimeout, 5*time.Second)
	def(&c.RetryMin, time.Second)
	def(&c.RetryMax, 30*time.Second)
	def(&c.FreezeTarget, 5*time.Millisecond)
	def(&c.HoldTimeout, 2*time.Second)
	if c.Granularity == 0 {
		c.Granularity = DefaultGranularity
	}
	if c.Granularity&(c.Granularity-1) != 0 || c.Granularity < 512 {
		return errors.New("mirror: Granularity must be a power of two of at least 512")
	}
	if c.ChunkSize == 0 {
		c.ChunkSize = DefaultChunkSize
	}
	c.ChunkSize = max(c.ChunkSize, c.Granularity)
	if c.Depth <= 0 {
		c.Depth = DefaultDepth
	}
	return nil
}

// ServedExport is the Export of a running server and the backend it
// serves.
type ServedExport struct {
	*server.Server
	Backend server.Backend
}

// ReadAt implements Export; blocking is fine for a copy.
func (e ServedExport) ReadAt(p []byte, off uint64) error { return e.Backend.ReadAt(p, off, false) }

// SourceFile implements FileExport when the backend is a plain file.
func (e ServedExport) SourceFile() *os.File {
	if f, ok := e.Backend.(*server.File); ok {
		return f.OSFile()
	}
	return nil
}

// Extents implements Export.
func (e ServedExport) Extents(off, length uint64, fn func(off, length uint64, hole bool) bool) error {
	return e.Backend.Extents(off, length, fn)
}
