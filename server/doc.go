// Package server serves one export, a regular file or a block device, to
// any number of NBD clients at once.
//
// It owns everything between the listener and the storage: the export and
// its size, the client connections (negotiation through package nbd, the
// access list, the kill switch, graceful shutdown), the order in which
// overlapping requests take effect, and durability. A mirror learns of
// changes through the write hook (Config.OnWrite, SetWriteHook), which
// also sees changes that failed part-way, stops the export for its final
// copy with Hold, and then either lets the held requests run (Resume) or
// abandons them unexecuted (DropHeld) when the destination took over. A
// migration destination admits only its source, one connection at a time,
// and learns that the source finished, through a SessionPolicy. The
// package knows nothing of mirrors or control sockets.
//
// # Request path
//
// Each connection has one reader goroutine. It decodes a request header,
// validates the request (refusals are answered at once, and a refused
// WRITE's payload is read and dropped so the stream stays in step),
// reserves buffer space, reads a WRITE's payload, and registers the
// request's byte range with the ordering gate. The request then runs its
// handler (handleRead, handleWrite, ...) against the Backend; a change is
// reported to the write hook before it is acknowledged; and the reply goes
// to the connection's reply writer, which sends everything queued in one
// writev.
//
// The ordering gate is shared by every connection of the export. A request
// waits only for requests registered before it whose range overlaps its own
// and of which at least one is a change; reads never wait for reads.
// Overlapping requests therefore take effect in arrival order, and a read
// never sees part of a write, which is more than the NBD specification
// asks of a server and what clients that pipeline overlapping requests
// (the C flexnbd's, a mirror replaying writes) silently rely on.
//
// # Concurrency
//
// A request that is cheap and cannot wait runs on the reader itself: a
// READ of at most 128 KiB or a WRITE of any size, without FUA, whose range
// nothing earlier holds. Reads there use RWF_NOWAIT, so data missing from
// the page cache fails fast with ErrWouldBlock instead of stalling the
// reader. A write has no such test, so the server's monitor watches it: a
// write still running after 50 ms hands the reading role to a new
// goroutine and finishes on its own. Replies of requests run on the reader
// are held back while more requests are already buffered, so a burst of
// small requests costs one read and one write system call. Copies that
// cannot block (cached reads, socket I/O, request headers included) use
// raw system calls, which keep the runtime from handing the processor to
// another thread mid-copy and from waking its monitor thread per request.
// With more than one connection open, a reader that has run requests for
// 50 µs without waiting wakes up to 8 readers of other connections whose
// requests wait in their sockets and, when other connections have unread
// requests, yields (turns.go): a burst on one connection, or a few
// connections served in step with their clients, do not hold the others
// back until the runtime's next look at the network or its next
// preemption.
// Everything else (cache misses, large reads, FUA, FLUSH, TRIM,
// WRITE_ZEROES, requests that must wait in the gate) runs on a goroutine of
// its own, at most MaxInFlight per connection, so one slow request does not
// hold up the ones behind it; past that limit the reader stops reading and
// TCP pushes back on the client. The data buffers one connection holds,
// payloads and read data alike, are bounded by MaxBufferBytes; replies
// not yet written count against it, so a client that stops reading its
// replies stalls itself, not the server, until WriteTimeout drops it.
//
// # Durability
//
// A reply to WRITE means the data reached the page cache (or the device's
// cache). FLUSH syncs the backend (fdatasync for File), covering every
// write answered before it. FUA on a WRITE makes that write durable before
// its reply (RWF_DSYNC); FUA on TRIM or WRITE_ZEROES syncs after the
// change. Shutdown and Close sync the export last of all.
//
// # Sparse exports
//
// The File backend keeps sparse files sparse. TRIM and WRITE_ZEROES punch
// holes; WRITE_ZEROES with NO_HOLE keeps the range allocated (zeroed by
// fallocate, not written), and with FAST_ZERO fails with ENOTSUP rather
// than write zeroes by hand. A WRITE leaves out every 4 KiB block of
// zeroes in its payload that lands in a hole, so copying a sparse image
// onto the export allocates nothing for its holes, even from a copier that
// sends them as data inside larger writes. On structured
// connections a READ sends holes as hole chunks, reading and allocating
// nothing for them, unless the client sets DF; BLOCK_STATUS reports
// base:allocation from SEEK_DATA and SEEK_HOLE.
//
// # Metrics
//
// With Config.Metrics set, the server counts every answered request by
// command (requests, bytes of the successful ones, a latency histogram
// from reading the header to handing the reply to the socket), error
// replies by code, and requests that waited in the ordering gate. The
// counters are atomics bumped without locks or allocations, one clock
// read per request and one per batch of replies; an exporter reads them
// whenever it likes. The package itself exports nothing to any
// monitoring system.
//
// # Errors
//
// A request that fails gets an error reply and the connection carries on:
// validation errors follow the specification (EINVAL, ENOSPC for WRITE and
// WRITE_ZEROES past the end, EPERM on a read-only export, ENOSPC for everything out of
// range on oldstyle sessions, as the C flexnbd answers), backend errors
// map to the nearest NBD code (EIO when there is none), and a panic in a
// handler is an EIO reply. Only a broken byte stream (a bad request magic,
// a failed read or write on the socket) ends the connection.
//
// BUG(server): A plain WRITE runs on the reader, and Backend has no
// non-blocking write: when the page cache throttles writers or the device
// stalls, later requests on that connection wait up to about 75 ms (until
// the monitor moves reading on) before they are even read.
//
// BUG(server): The kill switch closes the connection of a hung request but
// cannot cancel the backend call. Until it returns, its goroutine, its
// buffers and its range in the ordering gate stay taken, so overlapping
// requests from other clients wait for it too (and may be killed in turn).
// Oldstyle writes over 32 MiB, which stream on the reader, are not watched
// by the kill switch at all.
//
// BUG(server): Shutdown (even after its context ended) and Close wait for
// the backend calls in progress; a call that never returns makes them
// never return.
//
// BUG(server): A structured READ is described by at most 64 data and hole
// chunks; holes beyond that are sent as zeroes.
//
// BUG(server): An oldstyle WRITE over 32 MiB is streamed to the file as
// its payload arrives, holding its range in the ordering gate meanwhile;
// one cut off mid-payload stays written as far as it came, unacknowledged.
//
// BUG(server): Clients that never read their replies can fill MaxMemory
// but for the reserve kept for connections holding little; until
// WriteTimeout drops them (2 minutes by default), requests over 256 KiB of
// other clients wait for memory, and so does everyone once enough such
// clients fill the reserve too.
//
// BUG(server): Metrics count a request when its reply is handed to the
// reply writer: a reply lost with its connection is still counted, and a
// request dropped unexecuted (its payload cut off, or held at a hand-off
// and dropped) is not counted at all.
//
// BUG(server): The export size is fixed when serving starts; RESIZE is not
// supported, and a file that shrinks under the server makes reads past its
// new end fail with EIO.
//
// BUG(server): A WRITE reaches the file through a regular system call (it
// may sleep for writeback throttling and must not hold a processor then),
// which wakes the runtime's monitor thread when nothing else runs: one
// connection writing at queue depth 1 costs about twice nbdkit's CPU per
// request with the server on one core (0.61x its IOPS there; 0.95x on two
// shared cores).
//
// BUG(server): Turns every 50 µs (turns.go) give up throughput for the
// tail: on two cores shared with their clients, 8 connections at queue
// depth 1 get about 32k requests per second where readers left to run in
// step with their clients got 48k (at 2.7 times the p99). The quantum is
// fixed; it is not tuned to the load.
//
// BUG(server): A turn counts a connection as having requests waiting when
// its socket has data, even when its reader cannot run them: blocked
// sending replies to a client that does not read them, or waiting for a
// request slot or for memory. Next to such a connection the other readers
// yield every 50 µs for nothing (an epoll call and a yield each; not
// seen above the noise in the runs made), and flexnbd_turns_total counts
// those turns too.
package server
