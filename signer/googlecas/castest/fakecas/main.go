// Command fakecas serves the in-process fake of Google CAS (package castest)
// as a process, for end-to-end tests of the castellan binary with
// --signer googlecas --google-cas-insecure. It is a test tool, not a CA.
//
// It prints "listening on ADDR pool POOL" on stdout, writes the pool's CA chain
// (issuing CA, then root) to -chain-out, and runs until its stdin closes or it
// is signalled.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/castellan-ca/castellan/signer/googlecas/castest"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve the CAS API on")
	chainOut := flag.String("chain-out", "", "file to write the pool's CA chain to (PEM)")
	flag.Parse()
	if err := run(*listen, *chainOut); err != nil {
		log.Fatal(err)
	}
}

// run serves until stdin closes or a signal comes; its deferred Stop runs
// before main exits, on an error too.
func run(listen, chainOut string) error {
	s, err := castest.Listen(listen)
	if err != nil {
		return err
	}
	defer s.Stop()
	if chainOut != "" {
		if err := os.WriteFile(chainOut, []byte(s.Chain()), 0o644); err != nil {
			return err
		}
	}
	fmt.Printf("listening on %s pool %s\n", s.Addr, castest.Pool)

	done := make(chan struct{})
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); close(done) }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	select {
	case <-done:
	case <-sig:
	}
	return nil
}
