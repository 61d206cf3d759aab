// Package migration tests live migration with real flexnbd processes:
// serve on the source, listen on the destination, the mirror, break and
// mirror-speed commands, signals, killed and stopped destinations, links
// cut between two network namespaces, and the progress display.
package migration
