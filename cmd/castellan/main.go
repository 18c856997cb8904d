// Command castellan is the Castellan certificate authority server.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
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

// run serves until SIGINT or SIGTERM; its deferred stop restores the default
// signal handling before main exits.
func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return serve(ctx, os.Args[2:], os.Stderr)
}
