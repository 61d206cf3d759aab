// Package metrics tests --metrics with real flexnbd processes: serve,
// listen and proxy scraped over HTTP after real clients (qemu-io, nbdsh,
// our own client) sent known requests, a migration scraped on its source,
// and a proxy scraped after its upstream restarted.
package metrics
