// Package mirror migrates a live export to another NBD server while its
// clients keep working, and provides the policy of the server receiving it.
//
// # The source
//
// Start connects to the destination (which must greet within five seconds
// with an export of the same size) and installs the export's write hook
// before anything is read. An attempt then copies the export in passes
// over a dirty map of one bit per Granularity bytes. The first pass starts
// with every bit set; each worker takes a run of dirty blocks, clears
// their bits and only then reads them, so a write that lands meanwhile
// sets them again and a later pass copies them again. Data goes as
// WRITEs of ChunkSize bytes, Depth of them in flight, their payloads sent
// from the source file by the kernel (sendfile) when the export is a
// file served over a socket (FileExport), else read into buffers; holes go as
// WRITE_ZEROES, or not at all where the destination's BLOCK_STATUS says it
// reads zeroes already, or as zero data to a destination without
// WRITE_ZEROES (the C flexnbd's listen, which keeps zero blocks sparse).
//
// Convergence: when a pass leaves no more than the link moves in
// FreezeTarget, the freeze begins. When passes stop shrinking (clients
// write faster than the link copies), or after eight passes, the mirror
// switches to active mode: the write hook sends each client write to the
// destination before the client hears that it is done, unless a copy in
// flight overlaps it (then the range is marked dirty, since that copy may
// carry older data and land later). After at most three active passes the
// freeze begins whatever is left.
//
// The freeze: flush the destination while clients still run (again until
// a flush is done within FreezeTarget, so that the one inside the freeze
// finds little to write), hold new
// client requests and wait for the running ones (Export.Hold), copy what
// is dirty without the speed limit, flush the destination again, remove
// the source file (FinishUnlink), send DISC and confirm that the
// destination saw it, then drop the held requests unexecuted (their
// clients send them to the destination) or, with FinishNothing, resume
// them. A failure before the final flush was acknowledged resumes the held
// requests on the source; nothing is lost and no client sees an error.
//
// Any failure of the destination fails the attempt; the migration retries
// from the beginning after an exponential backoff with jitter (1 s to
// 30 s) until it succeeds or Break stops it.
//
// # The destination
//
// Destination is a server.SessionPolicy: until the hand-off it admits only
// clients asking for SourceExportName (in oldstyle, anyone, as the C
// flexnbd's listen does), one session at a time, and it completes when a
// source session ends with a successful FLUSH and then DISC (from an
// oldstyle source, DISC after its writes).
//
// BUG(mirror): A retry copies everything again: the destination may have
// restarted with anything in its file, and its block status is asked only
// about the source's holes.
//
// BUG(mirror): Active mode forwards a client write with a read of the
// source file after the write, not with the write's own buffer.
//
// BUG(mirror): Writes forwarded in active mode are not counted against
// the speed limit.
package mirror
