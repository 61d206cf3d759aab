// Package proxy forwards NBD clients to an upstream server and hides the
// server's restarts and migrations from them.
//
// Each downstream client gets its own upstream connection, made before the
// client is greeted (a client of a proxy whose servers are all down waits
// in its handshake). The client is offered what the upstream offers:
// size, flags, structured replies and base:allocation. Its reader decodes
// requests in arrival order and queues them on the upstream connection
// itself (nbd.Client.StartAsync), sending the queue whenever no more
// requests are at hand; the upstream reader answers each reply in a
// callback, and the answers gathered meanwhile are written together when
// it goes idle. An error reply from the server is the client's answer.
//
// When the upstream connection fails (EOF, reset, a malformed reply, no
// reply within Config.Timeout, which a watchdog checks), the reconnector
// closes it, connects again (the first round at once, then with
// exponential backoff and jitter capped at RetryMax, each round trying
// every upstream in order, keeping only an export of the same size) and
// sends every unanswered request again, oldest first, before any newer
// one. A request answered twice (on the
// old connection just before it failed, and again) is answered to the
// client once. An ESHUTDOWN from a stopping server is taken as the end of
// its connection, not as an answer. With MaxOutage, a request that has
// waited that long fails with EIO, whether the upstream is unreachable or
// only silent. A client that leaves without DISC is not waited for.
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
// Config.Cache turns on the C proxy's read-ahead (prefetch): see there.
//
// BUG(proxy): READ replies are copied through the proxy's memory; 1 MiB
// reads reach about a third of direct throughput on two cores. Splicing
// them socket to socket was measured slower there (docs/BENCHMARKS.md).
//
// BUG(proxy): A client sending large writes delays the other clients of
// the same proxy: beside one writing 1 MiB blocks at queue depth 32, another
// reading 4 KiB blocks at queue depth 1 got a p99 of 7-9 ms on two cores
// (0.6-0.7 ms direct to the server), 31-41 ms with --procs 1, where the raw
// socket calls keep the one processor through each megabyte's copy. With
// four processors on the two cores it was 6-7 ms: what is left is mostly
// the cores being full of copies, each request crossing two more hops that
// wait for one.
//
// BUG(proxy): Buffered payloads are bounded per client (twice MaxInFlight
// requests, up to 4 GiB of 32 MiB writes), not across clients.
package proxy
