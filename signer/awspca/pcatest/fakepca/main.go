// Command fakepca serves the in-process fake of AWS Private CA (package
// pcatest) as a process, for end-to-end tests of the castellan binary with
// --signer awspca --aws-pca-endpoint URL --aws-pca-insecure. It is a test
// tool, not a CA. Clients must sign with the fake's fixed test access key,
// e.g. given to castellan as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
//
// It prints "listening on URL ca ARN key ACCESS_KEY_ID secret
// SECRET_ACCESS_KEY" on stdout, writes the CA's chain (the
// CA certificate, then its root) to -chain-out, and then reads commands
// from stdin, one per line, answering each with "ok" (or "ok N") or
// "error: ..." on stdout:
//
//	rotate               re-certify the CA under a new root; rewrites -chain-out
//	throttle OP N        the next N calls of OP fail with ThrottlingException
//	pending DURATION     new certificates stay in progress for DURATION
//	get-delay DURATION   each GetCertificate answers after DURATION
//	issued               answers "ok N": certificates issued so far
//	calls OP             answers "ok N": calls of OP received so far
//
// It exits when stdin closes or it is signalled.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/awspca/pcatest"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve the PCA API on")
	chainOut := flag.String("chain-out", "", "file to write the CA's chain to (PEM: CA, then root)")
	flag.Parse()

	s, err := pcatest.Listen(*listen, pcatest.Options{})
	if err != nil {
		log.Fatal(err)
	}
	defer s.Stop()
	writeChain := func() error {
		if *chainOut == "" {
			return nil
		}
		return os.WriteFile(*chainOut, []byte(signer.EncodePEM(s.CACertificate(), s.Root())), 0o644)
	}
	if err := writeChain(); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("listening on %s ca %s key %s secret %s\n", s.URL, s.CAARN, pcatest.AccessKeyID, pcatest.SecretAccessKey)

	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(os.Stdin)
		for sc.Scan() {
			if err := command(s, strings.Fields(sc.Text()), writeChain); err != nil {
				fmt.Printf("error: %v\n", err)
			}
		}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	select {
	case <-done:
	case <-sig:
	}
}

// command runs one stdin command and prints its "ok" answer.
func command(s *pcatest.Server, f []string, writeChain func() error) error {
	duration := func() (time.Duration, error) {
		if len(f) != 2 {
			return 0, fmt.Errorf("%s takes one duration", f[0])
		}
		return time.ParseDuration(f[1])
	}
	switch {
	case len(f) == 0:
		return fmt.Errorf("empty command")
	case f[0] == "rotate" && len(f) == 1:
		if err := s.RotateCA(); err != nil {
			return err
		}
		if err := writeChain(); err != nil {
			return err
		}
	case f[0] == "throttle" && len(f) == 3:
		n, err := strconv.Atoi(f[2])
		if err != nil {
			return err
		}
		s.Throttle(f[1], n)
	case f[0] == "pending":
		d, err := duration()
		if err != nil {
			return err
		}
		s.SetPending(d)
	case f[0] == "get-delay":
		d, err := duration()
		if err != nil {
			return err
		}
		s.SetGetDelay(d)
	case f[0] == "issued" && len(f) == 1:
		fmt.Printf("ok %d\n", s.Issued())
		return nil
	case f[0] == "calls" && len(f) == 2:
		fmt.Printf("ok %d\n", s.Calls(f[1]))
		return nil
	default:
		return fmt.Errorf("unknown command %q", strings.Join(f, " "))
	}
	fmt.Println("ok")
	return nil
}
