package main

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/flexnbd/flexnbd/acl"
	"github.com/flexnbd/flexnbd/internal/testserver"
	"github.com/flexnbd/flexnbd/server"
)

// waitFor polls cond until it holds or the deadline passes; the server
// and the clients change state on their own goroutines.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestOpenHoldsNegotiatedConnectionsBesideABusyClient(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{})
	set, err := open(context.Background(), options{addr: inst.Addr, conns: 40, parallel: 4, timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer set.close(time.Second)
	if got := set.open(); got != 40 {
		t.Fatalf("open() = %d, want 40", got)
	}
	if got := inst.Server.NumClients(); got != 40 {
		t.Fatalf("server counts %d clients, want 40", got)
	}
	busy := inst.Dial(t, nil)
	buf := make([]byte, 4096)
	if err := busy.Read(context.Background(), buf, 0, 0); err != nil {
		t.Fatalf("read beside idle connections: %v", err)
	}
	if got := inst.Server.Stats().Requests; got != 1 {
		t.Fatalf("server saw %d requests, want only the busy client's 1", got)
	}
	set.close(5 * time.Second)
	waitFor(t, "the server has only the busy client", func() bool { return inst.Server.NumClients() == 1 })
}

func TestOpenCountsConnectionsTheServerDropped(t *testing.T) {
	inst := testserver.Start(t, testserver.Options{})
	set, err := open(context.Background(), options{addr: inst.Addr, conns: 10, parallel: 10, timeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer set.close(time.Second)
	denyAll, err := acl.New(nil, true)
	if err != nil {
		t.Fatal(err)
	}
	inst.Server.SetACL(denyAll)
	waitFor(t, "every idle connection is seen closed", func() bool { return set.open() == 0 })
}

func TestOpenFailsUnlessEveryConnectionNegotiates(t *testing.T) {
	t.Run("server full", func(t *testing.T) {
		inst := testserver.Start(t, testserver.Options{Config: server.Config{MaxClients: 5}})
		_, err := open(context.Background(), options{addr: inst.Addr, conns: 8, parallel: 8, timeout: 10 * time.Second})
		if err == nil {
			t.Fatal("opening 8 connections to a server taking 5 succeeded")
		}
		waitFor(t, "the connections opened are closed again", func() bool { return inst.Server.NumClients() == 0 })
	})
	t.Run("nothing listening", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := l.Addr().String()
		l.Close()
		if _, err := open(context.Background(), options{addr: addr, conns: 3, parallel: 2, timeout: 10 * time.Second}); err == nil {
			t.Fatal("open succeeded with nothing listening")
		}
	})
}
