package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/flexnbd/flexnbd/internal/rawsock"
)

// ClientOptions tune a Client. The zero value negotiates everything the
// server offers for the default export.
type ClientOptions struct {
	ExportName string
	// NoStructuredReplies keeps the connection on simple replies, as an
	// old client would.
	NoStructuredReplies bool
	// NoBlockStatus skips selecting base:allocation.
	NoBlockStatus bool
	// MaxInFlight bounds the requests waiting for replies; further calls
	// block until one completes. Default 64.
	MaxInFlight int
	// HandshakeTimeout bounds the negotiation. Default 10 s; the C
	// flexnbd waits 5 s for a greeting.
	HandshakeTimeout time.Duration
	// FenceKey, when set, is sent with FenceGen in OptFence (see there);
	// Session().Fenced says whether the server took it. A server that
	// refuses it (it has seen a newer generation) fails the handshake.
	FenceKey string
	FenceGen uint64
	// OnIdle, if set, is called by the reply reader each time it has
	// handled every reply received so far and is about to wait for more:
	// where a caller answering in callbacks (StartAsync) flushes what it
	// buffered.
	OnIdle func()
}

// write sends p whole; the caller holds wmu.
func (c *Client) write(p []byte) error {
	if c.raw != nil {
		_, err := c.raw.Write(p)
		return err
	}
	_, err := c.conn.Write(p)
	return err
}

// writeBufs sends *bufs whole, in order, and may consume it; the caller
// holds wmu. (A pointer, so that the fallback's WriteTo does not move the
// caller's slice to the heap on every call.)
func (c *Client) writeBufs(bufs *net.Buffers) error {
	if c.raw != nil {
		_, err := c.raw.Writev(*bufs)
		return err
	}
	_, err := bufs.WriteTo(c.conn)
	return err
}

// ErrClientClosed is returned for requests on a client that was closed.
var ErrClientClosed = errors.New("nbd: client closed")

// Client speaks the transmission phase to one server connection. Its
// methods are safe for concurrent use: requests from several goroutines are
// in flight together and replies are matched by cookie, in any order.
//
// A request cannot be retracted once sent, so cancelling the context of a
// waiting request breaks the whole connection: every pending request fails
// and the Client is unusable. Callers that retry open a new Client.
type Client struct {
	// immutable after NewClient
	conn net.Conn
	raw  *rawsock.Conn // conn's socket I/O without the runtime's system call overhead; nil for pipes
	sess Session
	sem  chan struct{}

	// wmu serialises request writes so headers and payloads never interleave.
	wmu sync.Mutex
	// queued holds requests StartAsync wrote but did not send yet (under
	// wmu); FlushRequests or the next synchronous send sends them.
	queued []byte
	// onIdle is ClientOptions.OnIdle.
	onIdle func()

	// owned by the reader goroutine
	br           *bufio.Reader
	chunkScratch [12]byte

	mu         sync.Mutex // guards the fields below
	pending    map[uint64]*call
	nextCookie uint64
	err        error // set once: why the connection is unusable
	readerDone chan struct{}
}

type call struct {
	req     Request
	buf     []byte // READ destination
	errno   Errno
	msg     string // error text from a structured error chunk
	extents []Extent
	covered uint64 // bytes of a structured READ described so far
	done    chan struct{}
	// fn, for StartAsync, is called instead of signalling done.
	fn func([]Extent, error)

	// request encoding, owned by Do
	hdr   [RequestHeaderSize]byte
	bufs  net.Buffers
	wbufs net.Buffers
}

// Dial connects to an NBD server at address ("host:port" for tcp, a path
// for unix) and negotiates.
func Dial(ctx context.Context, network, address string, opts *ClientOptions) (*Client, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("nbd: dial %s: %w", address, err)
	}
	c, err := NewClient(conn, opts)
	if err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

// NewClient negotiates on an established connection and starts the reply
// reader. On error the caller still owns conn.
func NewClient(conn net.Conn, opts *ClientOptions) (*Client, error) {
	if opts == nil {
		opts = &ClientOptions{}
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	timeout := opts.HandshakeTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	raw := rawsock.New(conn)
	var src io.Reader = conn
	if raw != nil {
		src = raw
	}
	br := bufio.NewReaderSize(src, 64<<10)
	_ = conn.SetDeadline(time.Now().Add(timeout))
	sess, err := clientHandshake(br, conn, opts)
	if err != nil {
		return nil, err
	}
	_ = conn.SetDeadline(time.Time{})
	max := opts.MaxInFlight
	if max <= 0 {
		max = 64
	}
	c := &Client{
		conn:       conn,
		raw:        raw,
		sess:       *sess,
		sem:        make(chan struct{}, max),
		br:         br,
		pending:    make(map[uint64]*call),
		nextCookie: 1,
		readerDone: make(chan struct{}),
		onIdle:     opts.OnIdle,
	}
	go c.readLoop()
	return c, nil
}

// Size is the export size in bytes.
func (c *Client) Size() uint64 { return c.sess.Export.Size }

// Flags are the export's transmission flags.
func (c *Client) Flags() TransmissionFlags { return c.sess.Flags }

// Session describes what the handshake agreed on.
func (c *Client) Session() Session { return c.sess }

// Err reports why the connection became unusable, or nil while it is fine.
func (c *Client) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.err
}

// Read fills p from offset off. A p larger than the server's maximum block
// size is read in pieces, several at a time.
func (c *Client) Read(ctx context.Context, p []byte, off uint64, flags CmdFlags) error {
	return c.transfer(ctx, CmdRead, p, off, flags)
}

// Write writes p at offset off; with CmdFlagFUA it returns once durable. A
// p larger than the server's maximum block size is written in pieces,
// several at a time: the pieces are not written atomically, and with an
// error some of them may have been written.
func (c *Client) Write(ctx context.Context, p []byte, off uint64, flags CmdFlags) error {
	return c.transfer(ctx, CmdWrite, p, off, flags)
}

// ReadTo reads length bytes from offset off and writes them to w in order,
// as Read would but without holding the whole range: it reads in pieces,
// several at a time, and hands each piece to w as soon as the pieces
// before it have been. After an error, from the server or from w, nothing
// more is written to w; w's error is returned as it is.
func (c *Client) ReadTo(ctx context.Context, w io.Writer, off, length uint64, flags CmdFlags) error {
	if off+length < off {
		return EINVAL
	}
	var free bufList
	return c.pipeline(ctx, CmdRead, off, length, c.streamPiece(), flags,
		func(lo, hi uint64) ([]byte, error) { return free.get(hi - lo), nil },
		func(p []byte) error {
			_, err := w.Write(p)
			free.put(p)
			return err
		})
}

// WriteFrom writes length bytes read from r at offset off, as Write would
// but without holding the whole range: it reads r one piece at a time,
// sending each piece while it reads the next, and never reads past length
// bytes. An error from r is returned as it is, except that r ending early
// is io.ErrUnexpectedEOF; the pieces read before it are still written.
func (c *Client) WriteFrom(ctx context.Context, r io.Reader, off, length uint64, flags CmdFlags) error {
	if off+length < off {
		return EINVAL
	}
	var free bufList
	return c.pipeline(ctx, CmdWrite, off, length, c.streamPiece(), flags,
		func(lo, hi uint64) ([]byte, error) {
			p := free.get(hi - lo)
			if _, err := io.ReadFull(r, p); err != nil {
				if err == io.EOF {
					err = io.ErrUnexpectedEOF
				}
				return nil, err
			}
			return p, nil
		},
		func(p []byte) error {
			free.put(p)
			return nil
		})
}

// maxPiecesInFlight bounds the pieces of one split transfer sent at a
// time, so one large transfer does not take every in-flight slot.
const maxPiecesInFlight = 4

// maxStreamPiece bounds the pieces of ReadTo and WriteFrom, which each
// need a buffer of their own: a stream holds at most maxPiecesInFlight of
// them, whatever its length.
const maxStreamPiece = 4 << 20

func (c *Client) streamPiece() uint64 {
	_, _, max := c.sess.Export.blockSizes()
	return min(uint64(max), maxStreamPiece)
}

func (c *Client) transfer(ctx context.Context, typ Cmd, p []byte, off uint64, flags CmdFlags) error {
	if off+uint64(len(p)) < off {
		return EINVAL
	}
	_, _, max := c.sess.Export.blockSizes()
	if len(p) <= int(max) {
		return c.transferOne(ctx, typ, p, off, flags)
	}
	return c.pipeline(ctx, typ, off, uint64(len(p)), uint64(max), flags,
		func(lo, hi uint64) ([]byte, error) { return p[lo:hi], nil },
		func([]byte) error { return nil })
}

// pipeline moves [off, off+length) in pieces of at most size bytes, with
// up to maxPiecesInFlight of them in flight. next supplies the buffer of
// the piece at off+lo before it is sent, and done takes it back once its
// reply came; both run on the caller's goroutine, in the order of the
// pieces. The first failure in that order, of a piece, next or done, stops
// the transfer and is returned once the pieces in flight have ended: every
// piece before it succeeded, and done is not called again.
func (c *Client) pipeline(ctx context.Context, typ Cmd, off, length, size uint64, flags CmdFlags,
	next func(lo, hi uint64) ([]byte, error), done func([]byte) error) error {
	type piece struct {
		buf   []byte
		err   error
		ended chan struct{}
	}
	var (
		inFlight []*piece // oldest first
		err      error
	)
	finishOldest := func() {
		p := inFlight[0]
		inFlight = inFlight[1:]
		<-p.ended
		if err == nil {
			err = p.err
		}
		if err == nil {
			err = done(p.buf)
		}
	}
	for lo := uint64(0); lo < length; {
		if len(inFlight) == maxPiecesInFlight {
			if finishOldest(); err != nil {
				break
			}
		}
		hi := lo + min(size, length-lo)
		buf, nerr := next(lo, hi)
		if nerr != nil {
			err = nerr
			break
		}
		p := &piece{buf: buf, ended: make(chan struct{})}
		go func(at uint64) {
			defer close(p.ended)
			p.err = c.transferOne(ctx, typ, p.buf, at, flags)
		}(off + lo)
		inFlight = append(inFlight, p)
		lo = hi
	}
	for len(inFlight) > 0 {
		finishOldest()
	}
	return err
}

// bufList recycles the buffers of a stream's pieces.
type bufList [][]byte

func (l *bufList) get(n uint64) []byte {
	if k := len(*l); k > 0 && uint64(cap((*l)[k-1])) >= n {
		p := (*l)[k-1][:n]
		*l = (*l)[:k-1]
		return p
	}
	return make([]byte, n)
}

func (l *bufList) put(p []byte) { *l = append(*l, p) }

func (c *Client) transferOne(ctx context.Context, typ Cmd, p []byte, off uint64, flags CmdFlags) error {
	req := Request{Type: typ, Flags: flags, Offset: off, Length: uint32(len(p))}
	var err error
	if typ == CmdWrite {
		_, err = c.Do(ctx, req, p, nil)
	} else {
		_, err = c.Do(ctx, req, nil, p)
	}
	return err
}

// Flush returns once every write completed before it is durable.
func (c *Client) Flush(ctx context.Context) error {
	_, err := c.Do(ctx, Request{Type: CmdFlush}, nil, nil)
	return err
}

// Trim tells the server a range is no longer needed.
func (c *Client) Trim(ctx context.Context, off uint64, length uint32, flags CmdFlags) error {
	_, err := c.Do(ctx, Request{Type: CmdTrim, Flags: flags, Offset: off, Length: length}, nil, nil)
	return err
}

// WriteZeroes makes a range read as zeroes.
func (c *Client) WriteZeroes(ctx context.Context, off uint64, length uint32, flags CmdFlags) error {
	_, err := c.Do(ctx, Request{Type: CmdWriteZeroes, Flags: flags, Offset: off, Length: length}, nil, nil)
	return err
}

// Cache asks the server to prefetch a range.
func (c *Client) Cache(ctx context.Context, off uint64, length uint32) error {
	_, err := c.Do(ctx, Request{Type: CmdCache, Offset: off, Length: length}, nil, nil)
	return err
}

// BlockStatus returns the base:allocation extents from off. The server may
// describe less than length (at least one extent) or, without
// CmdFlagReqOne, more.
func (c *Client) BlockStatus(ctx context.Context, off uint64, length uint32, flags CmdFlags) ([]Extent, error) {
	if c.sess.AllocationContext == 0 {
		return nil, fmt.Errorf("nbd: block status not negotiated: %w", EINVAL)
	}
	return c.Do(ctx, Request{Type: CmdBlockStatus, Flags: flags, Offset: off, Length: length}, nil, nil)
}

// Do sends req as given, without checking it against the negotiated flags
// (tests use it to send what a careful client would not), and waits for its
// reply. payload is sent after the header when req is a WRITE; readBuf
// receives READ data and must be req.Length bytes long. A server error is
// returned as an Errno, or as a *ServerError carrying the server's message.
func (c *Client) Do(ctx context.Context, req Request, payload, readBuf []byte) ([]Extent, error) {
	return c.do(ctx, req, payload, nil, readBuf)
}

// do is Do with the WRITE payload taken either from payload or, when src
// is not nil, from a file by the kernel.
func (c *Client) do(ctx context.Context, req Request, payload []byte, src *fileRange, readBuf []byte) ([]Extent, error) {
	cl, err := c.start(ctx, req, payload, src, readBuf)
	if err != nil {
		return nil, err
	}
	return c.finish(ctx, cl)
}

// Pending is a request Start sent; Wait returns its outcome.
type Pending struct {
	c   *Client
	cl  *call
	ctx context.Context
}

// Start sends req as Do does and returns without waiting for the reply,
// so that a caller can send requests in a chosen order (a proxy keeps its
// client's order) and collect the replies as they come. Wait must be
// called exactly once; ctx also bounds the wait.
func (c *Client) Start(ctx context.Context, req Request, payload, readBuf []byte) (*Pending, error) {
	cl, err := c.start(ctx, req, payload, nil, readBuf)
	if err != nil {
		return nil, err
	}
	return &Pending{c: c, cl: cl, ctx: ctx}, nil
}

// Wait returns the reply of a started request, as Do would.
func (p *Pending) Wait() ([]Extent, error) { return p.c.finish(p.ctx, p.cl) }

// start registers and sends a request. Once it returns a call, finish
// must be called with it, even if the send failed (the call then ends
// with the connection).
func (c *Client) start(ctx context.Context, req Request, payload []byte, src *fileRange, readBuf []byte) (*call, error) {
	if req.Type == CmdRead && len(readBuf) != int(req.Length) {
		return nil, fmt.Errorf("nbd: read buffer of %d bytes for a %d-byte read", len(readBuf), req.Length)
	}
	if req.Type == CmdDisc {
		return nil, errors.New("nbd: use Close to disconnect")
	}
	select {
	case c.sem <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}

	cl := getCall()
	cl.req, cl.buf = req, readBuf
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		putCall(cl)
		<-c.sem
		return nil, err
	}
	cl.req.Cookie = c.nextCookie
	c.nextCookie++
	c.pending[cl.req.Cookie] = cl
	c.mu.Unlock()

	cl.bufs = append(cl.bufs[:0], AppendRequest(cl.hdr[:0], cl.req))
	if req.Type == CmdWrite && len(payload) > 0 {
		cl.bufs = append(cl.bufs, payload)
	}
	c.wmu.Lock()
	cl.wbufs = cl.bufs // WriteTo consumes what it is given
	if len(c.queued) > 0 {
		// Requests queued by StartAsync go first, in their order.
		cl.wbufs = append(net.Buffers{c.queued}, cl.bufs...)
	}
	// A server that stops reading leaves the send blocked: the context
	// must reach it too, or a timeout would never fire. Background
	// contexts cannot end, and cost nothing here.
	var stop func() bool
	if ctx.Done() != nil {
		stop = context.AfterFunc(ctx, func() { _ = c.conn.SetWriteDeadline(time.Now()) })
	}
	var err error
	if src != nil {
		if len(c.queued) > 0 {
			err = c.write(c.queued)
		}
		if err == nil {
			err = c.sendFromFile(cl.bufs[0], src)
		}
	} else {
		err = c.writeBufs(&cl.wbufs)
	}
	c.queued = c.queued[:0]
	if stop != nil {
		stop()
	}
	c.wmu.Unlock()
	if err != nil {
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%w)", ctx.Err(), err)
		}
		c.fail(fmt.Errorf("nbd: send request: %w", err))
	}
	return cl, nil
}

// finish waits for cl's reply (ctx ending breaks the connection, since a
// sent request cannot be retracted) and releases its slot.
func (c *Client) finish(ctx context.Context, cl *call) ([]Extent, error) {
	defer func() { <-c.sem }()
	defer putCall(cl)
	select {
	case <-cl.done:
	case <-ctx.Done():
		c.fail(ctx.Err())
		<-cl.done
	}
	switch {
	case cl.errno == errConnLost:
		return nil, c.Err()
	case cl.errno != 0 && cl.msg != "":
		return nil, &ServerError{Code: cl.errno, Message: cl.msg}
	case cl.errno != 0:
		return nil, cl.errno
	}
	return cl.extents, nil
}

// Calls are recycled: a steady stream of requests allocates nothing. done
// is buffered and signalled by a send, so the channel is reused too.
var callPool = sync.Pool{New: func() any { return &call{done: make(chan struct{}, 1)} }}

func getCall() *call { return callPool.Get().(*call) }

// putCall recycles cl once its Do returned; the reader no longer knows it.
func putCall(cl *call) {
	done := cl.done
	bufs := cl.bufs
	clear(bufs[:cap(bufs)])
	*cl = call{done: done, bufs: bufs[:0]}
	callPool.Put(cl)
}

// ServerError is an error reply that came with a message from the server.
type ServerError struct {
	Code    Errno
	Message string
}

func (e *ServerError) Error() string { return e.Code.Error() + ": " + e.Message }

// Errno exposes the wire code to ErrnoOf.
func (e *ServerError) Errno() Errno { return e.Code }

// Unwrap lets errors.Is(err, nbd.EINVAL) see through the message.
func (e *ServerError) Unwrap() error { return e.Code }

// errConnLost marks calls that ended because the connection did, not
// because the server answered; it is never sent on the wire.
const errConnLost Errno = 0xffffffff

// fail makes the client unusable. It returns once the reader has stopped,
// so no caller's buffer is written to afterwards; the reader completes the
// pending calls on its way out.
func (c *Client) fail(err error) {
	c.mu.Lock()
	if c.err == nil {
		c.err = err
	}
	c.mu.Unlock()
	_ = c.conn.Close()
	<-c.readerDone
}

// Close waits for pending requests, sends NBD_CMD_DISC and closes the
// connection.
func (c *Client) Close() error {
	defer c.quiesce()()
	_, err := c.sendDisc()
	c.fail(ErrClientClosed)
	return err
}

// Abort closes the connection at once, without NBD_CMD_DISC: requests in
// flight fail, and the server sees the connection break instead of a clean
// end. A migration source ends a failed attempt so, because a destination
// takes a DISC after a successful FLUSH for "complete".
func (c *Client) Abort() { c.fail(ErrClientClosed) }

// Disconnect waits for pending requests, sends NBD_CMD_DISC and then waits
// until the server closes the connection, which a server does once it has
// read the request: nil confirms that the server saw the disconnect, which
// a migration's hand-off relies on. ctx bounds the wait; the connection is
// closed either way.
func (c *Client) Disconnect(ctx context.Context) error {
	defer c.quiesce()()
	sent, err := c.sendDisc()
	if !sent {
		c.fail(ErrClientClosed)
		if err == nil {
			err = c.Err()
		}
		return fmt.Errorf("nbd: disconnect: %w", err)
	}
	select {
	case <-c.readerDone:
	case <-ctx.Done():
		c.fail(ErrClientClosed)
		return fmt.Errorf("nbd: disconnect not confirmed: %w", ctx.Err())
	}
	err = c.Err()
	c.fail(ErrClientClosed)
	if !errors.Is(err, io.EOF) {
		return fmt.Errorf("nbd: disconnect not confirmed: %w", err)
	}
	return nil
}

// quiesce waits out the requests in flight by taking every slot of the
// semaphore; the function it returns gives them back, so that late callers
// see the client's error rather than block.
func (c *Client) quiesce() (release func()) {
	for i := 0; i < cap(c.sem); i++ {
		c.sem <- struct{}{}
	}
	return func() {
		for i := 0; i < cap(c.sem); i++ {
			<-c.sem
		}
	}
}

// sendDisc sends NBD_CMD_DISC unless the connection already failed.
func (c *Client) sendDisc() (sent bool, err error) {
	c.mu.Lock()
	alive := c.err == nil
	c.mu.Unlock()
	if !alive {
		return false, nil
	}
	c.wmu.Lock()
	c.queued = AppendRequest(c.queued, Request{Type: CmdDisc})
	err = c.write(c.queued)
	c.queued = c.queued[:0]
	c.wmu.Unlock()
	if err != nil {
		return false, fmt.Errorf("nbd: send disconnect: %w", err)
	}
	return true, nil
}

// maxChunkMeta bounds the chunks that are buffered rather than streamed
// into the caller's buffer: block status lists and error messages.
const maxChunkMeta = 1 << 20
