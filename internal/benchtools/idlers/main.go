// Command idlers holds idle NBD connections open for the benchmark's idle
// case (scripts/bench.sh, workloads ending in _iN): it opens -conns
// connections to one server, completes the handshake on each, and then
// sends nothing until SIGTERM or SIGINT, so that busy clients of the same
// server can be measured beside a crowd of idle ones.
//
// Once every connection has negotiated it creates the -ready file (the
// benchmark waits for it). On the signal it disconnects them and prints one
// JSON object on standard output: how many connections it opened and how
// many were still open when it was stopped, since a server that dropped
// idle clients would make the comparison meaningless. It exits 1 when it
// could not open them all.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	var o options
	var ready string
	flag.StringVar(&o.addr, "addr", "", "host:port of the server")
	flag.StringVar(&o.export, "export", "", "export name to ask for")
	flag.IntVar(&o.conns, "conns", 1000, "connections to open and keep idle")
	flag.IntVar(&o.parallel, "parallel", 8, "handshakes in progress at once")
	flag.DurationVar(&o.timeout, "timeout", 60*time.Second, "how long opening every connection may take")
	flag.StringVar(&ready, "ready", "", "file to create once every connection has negotiated")
	flag.Parse()
	if o.addr == "" || o.conns < 1 || o.parallel < 1 {
		fmt.Fprintln(os.Stderr, "idlers: -addr, a positive -conns and a positive -parallel are required")
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	set, err := open(ctx, o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "idlers: %v\n", err)
		os.Exit(1)
	}
	if ready != "" {
		if err := os.WriteFile(ready, nil, 0o644); err != nil {
			set.close(time.Second)
			fmt.Fprintf(os.Stderr, "idlers: %v\n", err)
			os.Exit(1)
		}
	}
	<-ctx.Done()
	rep := report{Conns: len(set.clients), Open: set.open()}
	set.close(5 * time.Second)
	_ = json.NewEncoder(os.Stdout).Encode(rep)
}

// report is what idlers prints when it stops.
type report struct {
	Conns int `json:"conns"`
	// Open counts the connections still usable when the signal came.
	Open int `json:"open"`
}
