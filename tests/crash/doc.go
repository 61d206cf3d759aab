// Package crash kills a serving flexnbd with SIGKILL while clients write
// with FUA and FLUSH, and checks that every write it acknowledged is in
// the file.
package crash
