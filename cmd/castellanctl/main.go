// Command castellanctl is Castellan's operator CLI: it reads the server's
// address and the operator credential from the server's data directory (or
// flags) and talks to the admin API over mutual TLS.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"
)

const usage = `usage: castellanctl [global flags] COMMAND [flags]

Commands:
  bundle                      print the trust bundle (PEM)
  issue --identity ID         make a key and CSR locally, get a certificate, write PEM files
  audit list [filters]        print audit records (JSON lines or a table)
  audit show WRITER/SEQ | --serial HEX | --fingerprint HEX
                              print records in full, undelivered markers included
  audit verify                check the audit hash chains; exit 1 on a break
  audit verify --file EXPORT --checkpoint-key PUB [--previous EARLIER] [--allow-unsigned]
                              verify an export offline, without the server
  audit export [filters] [--format jsonl|csv] [--out FILE]
                              write every matching record, all writers, oldest first;
                              without filters, jsonl is verifiable offline (checkpoints,
                              records, a head signed with the checkpoint key)
  audit checkpoint-key        print the checkpoint public key (PEM) exports are verified with
  audit prune --before DATE   remove records older than DATE, leaving a signed checkpoint
  doctor [--kubeconfig FILE] [--full]
                              check the deployment: server, serving certificate, trust
                              bundle copies, audit chain, CA expiry, clock skew, RBAC;
                              exit 1 when a check fails
  completion bash|zsh         print a shell completion script
  ca status                   every CA: key id, phase, validity, latest dependent NotAfter
  ca rotate prepare|activate|retire [--target root|intermediate] [--force]
                              run one CA rotation step (refused when unsafe unless --force)
  ca rekey --new-kek-file FILE | --finish
                              seal every CA key under the key-encryption key in FILE (a
                              file on the server, one it is configured with) beside the
                              old one; --finish drops the old once every replica has it

Global flags:
`

// exitError carries a process exit code through the command functions.
type exitError struct{ code int }

func (e exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	var ee exitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		os.Exit(ee.code)
	case errors.Is(err, flag.ErrHelp):
		os.Exit(2)
	default:
		textOut{os.Stderr}.println("castellanctl:", err)
		os.Exit(1)
	}
}

// run parses the global flags and dispatches the command.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	var g globals
	fs := flag.NewFlagSet("castellanctl", flag.ContinueOnError)
	fs.SetOutput(linesOut{stderr})
	g.bind(fs)
	fs.Usage = func() {
		textOut{stderr}.printf(usage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	rest := fs.Args()
	if len(rest) == 0 {
		fs.Usage()
		return exitError{2}
	}
	ctx, cancel := context.WithTimeout(ctx, g.timeout)
	defer cancel()
	switch rest[0] {
	case "bundle":
		return cmdBundle(ctx, &g, rest[1:], stdout, stderr)
	case "issue":
		return cmdIssue(ctx, &g, rest[1:], stdout, stderr)
	case "ca":
		return cmdCA(ctx, &g, rest[1:], stdout, stderr)
	case "doctor":
		return cmdDoctor(ctx, &g, rest[1:], stdout, stderr)
	case "completion":
		return cmdCompletion(ctx, rest[1:], stdout)
	case "audit":
		if len(rest) < 2 {
			return fmt.Errorf("audit: want list, show, verify, export, prune or checkpoint-key")
		}
		switch rest[1] {
		case "list":
			return cmdAuditList(ctx, &g, rest[2:], stdout, stderr)
		case "show":
			return cmdAuditShow(ctx, &g, rest[2:], stdout, stderr)
		case "verify":
			return cmdAuditVerify(ctx, &g, rest[2:], stdout, stderr)
		case "export":
			return cmdAuditExport(ctx, &g, rest[2:], stdout, stderr)
		case "prune":
			return cmdAuditPrune(ctx, &g, rest[2:], stdout, stderr)
		case "checkpoint-key":
			return cmdAuditCheckpointKey(ctx, &g, rest[2:], stdout, stderr)
		}
		return fmt.Errorf("audit: unknown subcommand %q", rest[1])
	}
	fs.Usage()
	return fmt.Errorf("unknown command %q", rest[0])
}

// newProgress returns the progress line of a long operation on stderr, or
// nil (quiet) when --progress and stderr say so.
func (g *globals) newProgress(stderr io.Writer, what, unit string) (*progress, error) {
	on, err := progressEnabled(g.progress, stderr)
	if err != nil {
		return nil, err
	}
	return newProgress(on, stderr, time.Now, what, unit), nil
}

// newFlagSet returns the flag set of command name, which reports parse
// errors and usage to stderr and returns them rather than exiting.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(linesOut{stderr})
	return fs
}

// globals are the connection settings every command shares.
type globals struct {
	dataDir    string
	server     string
	serverName string
	cert       string
	key        string
	caFile     string
	timeout    time.Duration
	progress   string
}

func (g *globals) bind(fs *flag.FlagSet) {
	fs.StringVar(&g.dataDir, "data-dir", defaultDataDir(), "the server's data directory: address and operator credential are read from it")
	fs.StringVar(&g.server, "server", "", "server address host:port (default: from DATA_DIR/server.json)")
	fs.StringVar(&g.serverName, "server-name", "", "DNS name to verify in the server certificate (default: from server.json)")
	fs.StringVar(&g.cert, "cert", "", "operator client certificate chain PEM (default: DATA_DIR/operator/cert-chain.pem)")
	fs.StringVar(&g.key, "key", "", "operator client key PEM (default: DATA_DIR/operator/key.pem)")
	fs.StringVar(&g.caFile, "ca", "", "trust bundle to verify the server (default: DATA_DIR/root-cert.pem)")
	fs.DurationVar(&g.timeout, "timeout", 30*time.Second, "overall deadline for the command")
	fs.StringVar(&g.progress, "progress", progressAuto, "progress of audit verify, export and prune on stderr: auto (when stderr is a terminal) | always | never")
}
