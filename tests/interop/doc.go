// Package interop runs real NBD clients against in-process flexnbd servers:
// qemu-io and qemu-img (QEMU's client), nbdinfo, nbdcopy and nbdsh (libnbd),
// fio's nbd engine, and flexnbd's own client under concurrency, in the
// oldstyle handshake of C flexnbd fleets and behind an access list.
//
// The package has tests only. Each test finds its tool with
// testserver.Tool, so a machine without the tool fails loudly instead of
// passing vacuously; .ci/run installs them all. Files are sparse temporary
// files on the test's own directory, and every server listens on an
// ephemeral loopback port.
package interop
