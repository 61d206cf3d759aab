//go:build race

package main

// A race-enabled test run builds the binary under test with the race
// detector too, so that a race in the command itself fails the run.
func init() { raceBuild = true }
