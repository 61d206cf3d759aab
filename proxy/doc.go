// Package proxy forwards NBD clients to an upstream server and hides the
// server's restarts and migrations from them.
//
// Each downstream client gets its own upstream connection, made before the
// client is greeted (a client of a proxy whose servers are all down waits
// in its handshake). The client is offered what the upstream offers:
// size, flags, structured replies and base:allocation. A reader decodes
// its requests in arrival order and a single sender sends them upstream in
// that order (nbd.Client.Start), many in flight; a waiter per request
// answers the client when the upstream replies. An error reply from the
// server is the client's answer.
//
// When the upstream connection fails (EOF, reset, a malformed reply, no
// reply within Config.Timeout), the sender closes it, connects again (the
// first round at once, then with exponential backoff and jitter capped at
// RetryMax, each round trying every upstream in order, keeping only an
// export of the same size) and sends every unanswered request again,
// oldest first, before any newer one. A request answered twice (on the
// old connection just before it failed, and again) is answered to the
// client once. With MaxOutage, requests fail with EIO once the upstream
// has been unreachable that long.
//
// Fencing: each client's upstream connections carry a random key and a
// rising generation in nbd.OptFence; a flexnbd server lets a newer
// connection start only once the older one stopped reading and finished
// what it had admitted, so an original never runs after its replay.
//
// BUG(proxy): Servers without nbd.OptFence (nbdkit, the C flexnbd) cannot
// be fenced: after a timeout against such a server that is stopped rather
// than dead, an original may still run after its replay.
//
// BUG(proxy): The prefetch cache (--cache) and the control socket
// (status, upstream) are not implemented yet.
//
// BUG(proxy): READ and WRITE buffers are allocated per request.
package proxy
