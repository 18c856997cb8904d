package main

import (
	"context"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"text/tabwriter"
	"time"

	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/internal/atomicfile"
	"github.com/castellan-ca/castellan/internal/keyfile"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
)

func cmdBundle(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("bundle", stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	resp, err := client.GetTrustBundle(ctx, &adminpb.GetTrustBundleRequest{})
	if err != nil {
		return fmt.Errorf("get trust bundle: %w", err)
	}
	_, err = io.WriteString(stdout, resp.GetBundlePem())
	return err
}

func cmdIssue(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("issue", stderr)
	identity := fs.String("identity", "", "SPIFFE ID to issue: spiffe://<trust-domain>/ns/<ns>/sa/<sa> (required)")
	outDir := fs.String("out-dir", ".", "directory for key.pem (0600), cert-chain.pem and root-cert.pem (created 0700 if missing)")
	ttl := fs.Duration("ttl", 0, "requested lifetime (default: the server's default)")
	keyType := fs.String("key-type", "ecdsa-p256", "key to generate: ecdsa-p256 | ecdsa-p384 | rsa-2048 | rsa-3072 | rsa-4096")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *identity == "" {
		return fmt.Errorf("issue: --identity is required")
	}
	key, err := keyfile.GenerateKey(*keyType)
	if err != nil {
		return err
	}
	// The CSR names the identity as pilot-agent's do: the server decides
	// what is granted either way, but a backend that reads names only from
	// the CSR (signer kubernetes forwards it to a cluster's CSR API) needs it.
	id, err := url.Parse(*identity)
	if err != nil {
		return fmt.Errorf("issue: --identity: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id}}, key)
	if err != nil {
		return fmt.Errorf("create CSR: %w", err)
	}
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	resp, err := client.IssueCertificate(ctx, &adminpb.IssueCertificateRequest{
		Csr:             string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})),
		Identity:        *identity,
		ValiditySeconds: int64(ttl.Seconds()),
	})
	if err != nil {
		return fmt.Errorf("issue: %w", err)
	}
	elems := resp.GetCertChain()
	if len(elems) < 2 {
		return fmt.Errorf("issue: server returned %d elements, want at least 2", len(elems))
	}
	keyPEM, err := keyfile.MarshalPrivateKeyPEM(key)
	if err != nil {
		return err
	}
	// The directory holds a private key: one created here is its owner's only.
	if err := os.MkdirAll(*outDir, 0o700); err != nil {
		return err
	}
	var chain string
	for _, e := range elems[:len(elems)-1] {
		chain += e
	}
	files := []struct {
		name string
		data string
		mode os.FileMode
	}{
		{"key.pem", string(keyPEM), 0o600},
		{"cert-chain.pem", chain, 0o644},
		{"root-cert.pem", elems[len(elems)-1], 0o644},
	}
	for _, f := range files {
		p := filepath.Join(*outDir, f.name)
		if err := atomicfile.Write(p, []byte(f.data), f.mode); err != nil {
			return fmt.Errorf("write %s: %w", p, err)
		}
		textOut{stdout}.println(p)
	}
	return nil
}

func cmdAuditList(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("audit list", stderr)
	filters := bindAuditFilters(fs)
	limit := fs.Int("limit", 0, "at most this many records (default: all)")
	output := fs.String("output", "table", "table | json (one object per line)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	req, err := filters()
	if err != nil {
		return fmt.Errorf("audit list: %w", err)
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("audit list: --output must be table or json")
	}
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()

	tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
	table := textOut{tw}
	if *output == "table" {
		table.println("SEQ\tTIME\tKIND\tOUTCOME\tCODE\tREASON\tCALLER\tGRANTED\tSERIAL\tWRITER")
	}
	enc := json.NewEncoder(stdout)
	const page = 1000
	pageSize := func(seen int) int {
		if *limit > 0 {
			return min(page, *limit-seen)
		}
		return page
	}
	for p, err := range auditPages(ctx, client, req, pageSize) {
		if err != nil {
			return fmt.Errorf("audit list: %w", err)
		}
		r, err := adminapi.RecordFromProto(p)
		if err != nil {
			return fmt.Errorf("audit list: %w", err)
		}
		if *output == "json" {
			if err := enc.Encode(&r); err != nil {
				return err
			}
			continue
		}
		table.printf("%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", r.Seq, r.Time.Format(time.RFC3339), r.Kind, r.Outcome,
			r.Code, r.Reason, r.Caller, r.GrantedIdentity, r.Serial, r.Writer)
	}
	return tw.Flush()
}

func cmdAuditVerify(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("audit verify", stderr)
	file := fs.String("file", "", "verify this export (castellanctl audit export) offline, without the server")
	key := fs.String("checkpoint-key", "", "with --file: the checkpoint public key (PEM) the export must be signed by")
	previous := fs.String("previous", "", "with --file: an earlier export of the same log; every record its head names must still be there")
	allowUnsigned := fs.Bool("allow-unsigned", false, "with --file: exit 0 for an export without a signed head whose chains are intact")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("audit verify: unexpected arguments %v", fs.Args())
	}
	if *file != "" {
		p, err := g.newProgress(stderr, "audit verify "+*file, "bytes")
		if err != nil {
			return err
		}
		return cmdAuditVerifyFile(*file, *key, *previous, *allowUnsigned, stdout, p)
	}
	if *key != "" || *previous != "" || *allowUnsigned {
		return errors.New("audit verify: --checkpoint-key, --previous and --allow-unsigned go with --file")
	}
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	p, err := g.newProgress(stderr, "audit verify (on the server)", "records")
	if err != nil {
		return err
	}
	stop := make(chan struct{})
	go p.whileWaiting(stop)
	res, err := client.VerifyAuditLog(ctx, &adminpb.VerifyAuditLogRequest{})
	close(stop)
	p.Done()
	if err != nil {
		return fmt.Errorf("audit verify: %w", err)
	}
	out := textOut{stdout}
	if !res.GetOk() {
		out.printf("audit log BROKEN at writer %s seq %d: %s (%d records checked)\n", res.GetWriter(), res.GetSeq(), res.GetProblem(), res.GetRecords())
		return exitError{1}
	}
	out.printf("audit log intact: %d records, %d writer(s)", res.GetRecords(), res.GetWriters())
	if n := res.GetCheckpoints(); n > 0 {
		out.printf(", from %d signed prune checkpoint(s)", n)
	}
	out.println()
	return nil
}
