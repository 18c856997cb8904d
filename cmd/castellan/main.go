// Command castellan is the Castellan certificate authority server.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
)

const usage = `usage: castellan serve [flags]   run the CA (castellan serve -h lists the flags)`

func main() {
	if len(os.Args) < 2 || os.Args[1] != "serve" {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "castellan:", err)
		os.Exit(1)
	}
}

// defaultGCPercent is the server's GOGC unless the environment sets one.
// Its live heap is small (tens of MiB) and its garbage per certificate
// large: collecting half as often cost ~9 MiB of peak RSS and saved 6–8% of
// CPU per certificate under load (BENCHMARKS.md, "Hot path profile").
const defaultGCPercent = 200

// run serves until SIGINT or SIGTERM; its deferred stop restores the default
// signal handling before main exits.
func run() error {
	if _, set := os.LookupEnv("GOGC"); !set {
		debug.SetGCPercent(defaultGCPercent)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return serve(ctx, os.Args[2:], os.Stderr)
}
