// Package nbd speaks the Network Block Device protocol on the wire, for
// both ends of a connection. It knows bytes, not files: a server built on
// it decides what an export holds, and a client built on it decides what
// to do with the data. The numbers come from the protocol specification
// (doc/proto.md of the NetworkBlockDevice/nbd project) and are pinned by
// proto_test.go.
//
// # Protocol flow
//
// A connection starts with the server's greeting. In the oldstyle form
// (the only one the C flexnbd speaks) the greeting already describes the
// single export, its size and flags, and the connection is in transmission
// at once. In the newstyle form the server offers handshake flags and the
// client answers with its own; then the client sends options and the
// server answers each one ("option haggling"): STRUCTURED_REPLY,
// LIST/SET_META_CONTEXT to select base:allocation, INFO to inspect an
// export, LIST to enumerate exports. GO (or the older EXPORT_NAME, which
// cannot report errors) ends haggling and enters transmission; ABORT ends
// the connection cleanly. ServerHandshake plays the server's part and
// returns the Session both sides agreed on.
//
// In transmission the client sends fixed 28-byte request headers
// (DecodeRequest, AppendRequest), a WRITE followed by its payload. The
// server answers each request with a simple reply (a 16-byte header,
// followed by the data of a successful READ) or, once structured replies
// were negotiated, with one or more chunks, the last one flagged done:
// data and hole chunks for READ, a block status chunk, error chunks that
// may carry a message. Replies may come in any order; the cookie in each
// one names its request. The encoders append to a caller's buffer so a
// server can build replies without allocating.
//
// # Client
//
// Dial or NewClient negotiates (structured replies and base:allocation
// when the server offers them, GO with a fallback to EXPORT_NAME, or
// oldstyle when the greeting says so) and starts a reader goroutine. The
// Client is safe for concurrent use: each call takes a fresh cookie, sends
// its request and waits, so up to MaxInFlight requests are outstanding at
// once and their replies are matched by cookie in whatever order they
// arrive. Read data is written straight into the caller's buffer, and
// only within the range the request asked for.
//
// A request cannot be withdrawn once sent, so cancelling the context of a
// waiting call, a protocol violation by the server or a broken connection
// all end the Client: every pending call fails with the same error, later
// calls fail at once, and Err reports why. A server's per-request error is
// not such a failure: the call returns an Errno, or a *ServerError when
// the server sent a message with it, and the connection carries on.
//
// # URIs
//
// ParseURI reads the nbd:// and nbd+unix:// URIs of doc/uri.md into the
// network, address and export name to dial and ask for; URI.String
// writes one. The TLS schemes are refused, since nothing here speaks TLS.
package nbd

// BUG(nbd): TLS is not implemented: STARTTLS is answered with
// NBD_REP_ERR_UNSUP and the client never asks for it.
//
// BUG(nbd): Extended headers (64-bit lengths, NBD_OPT_EXTENDED_HEADERS)
// are not implemented; requests and replies use the compact 32-bit forms.
//
// BUG(nbd): The only metadata context is base:allocation; queries for any
// other namespace select nothing.
//
// BUG(nbd): The oldstyle greeting serves the default export only, and the
// server side of EXPORT_NAME can refuse an export only by closing the
// connection, as the protocol leaves it no other way.
//
// BUG(nbd): The Client checks that each data or hole chunk of a
// structured READ lies inside the request, and that the lengths of the
// chunks of a successful reply add up to the request's length, but not
// that the chunks are disjoint. Overlapping chunks that repeat more bytes
// than the reply leaves out make the sum too large and fail the
// connection; a reply that repeats exactly as many bytes as it leaves out
// passes, and the bytes no chunk described keep whatever the caller's
// buffer held.
//
// BUG(nbd): RESIZE and PEEK_EXPORT are not implemented.
