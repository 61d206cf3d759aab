//go:build race

package metrics

// A race-enabled test run builds the command under test with the race
// detector too, so that a race in it fails the run.
func init() { raceBuild = true }
