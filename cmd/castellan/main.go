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
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := serve(ctx, os.Args[2:], os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "castellan:", err)
		os.Exit(1)
	}
}
