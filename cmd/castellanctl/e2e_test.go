package main

// End-to-end tests of castellanctl against a real `castellan serve` process:
// issuance and refusals, the audit log and its tamper evidence, restarts,
// operator authorization and the intermediate signer's hot reload.

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"database/sql"
	"encoding/asn1"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
	"github.com/castellan-ca/castellan/cmd/internal/servetest"
	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	_ "modernc.org/sqlite" // "sqlite" driver, to tamper with the audit store
)

const operatorID = "spiffe://cluster.local/castellan/operator"

var oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}

// issuedFiles is what `castellanctl issue` wrote into one --out-dir.
type issuedFiles struct {
	dir   string
	key   crypto.Signer
	chain []*x509.Certificate // cert-chain.pem: leaf, intermediates
	roots []byte              // root-cert.pem
}

func (f issuedFiles) leaf() *x509.Certificate { return f.chain[0] }

// readIssued parses an --out-dir and checks what holds for every issuance:
// key.pem 0600 matching the leaf, and the chain verifying to root-cert.pem.
func readIssued(dir string) (issuedFiles, error) {
	f := issuedFiles{dir: dir}
	keyPath := filepath.Join(dir, "key.pem")
	fi, err := os.Stat(keyPath)
	if err != nil {
		return f, err
	}
	if fi.Mode().Perm() != 0o600 {
		return f, fmt.Errorf("key.pem mode %s, want 0600", fi.Mode().Perm())
	}
	b, err := os.ReadFile(keyPath)
	if err != nil {
		return f, err
	}
	if f.key, err = keyfile.ParsePrivateKeyPEM(b); err != nil {
		return f, fmt.Errorf("key.pem: %w", err)
	}
	if b, err = os.ReadFile(filepath.Join(dir, "cert-chain.pem")); err != nil {
		return f, err
	}
	if f.chain, err = signer.ParseCertificatesPEM(b); err != nil {
		return f, fmt.Errorf("cert-chain.pem: %w", err)
	}
	if f.roots, err = os.ReadFile(filepath.Join(dir, "root-cert.pem")); err != nil {
		return f, err
	}
	rootCerts, err := signer.ParseCertificatesPEM(f.roots)
	if err != nil {
		return f, fmt.Errorf("root-cert.pem: %w", err)
	}
	pub, ok := f.key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(f.leaf().PublicKey) {
		return f, errors.New("key.pem is not the key of the leaf")
	}
	if err := verifyChain(f.chain, rootCerts); err != nil {
		return f, fmt.Errorf("chain does not verify to its root-cert.pem: %w", err)
	}
	return f, nil
}

// verifyChain verifies chain (leaf first) to roots for both workload usages.
func verifyChain(chain, roots []*x509.Certificate) error {
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	for _, u := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := chain[0].Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{u}}); err != nil {
			return err
		}
	}
	return nil
}

// issue runs `castellanctl issue` into a fresh directory and reads the result.
func issue(t *testing.T, data, identity string, extra ...string) issuedFiles {
	t.Helper()
	out := filepath.Join(t.TempDir(), "out")
	f := issueInto(t, data, out, identity, extra...)
	// castellanctl created out, which holds a private key: only its owner may enter it.
	if fi, err := os.Stat(out); err != nil {
		t.Error(err)
	} else if fi.Mode().Perm() != 0o700 {
		t.Errorf("--out-dir created with mode %v, want 0700", fi.Mode().Perm())
	}
	return f
}

// issueInto is issue with the --out-dir given.
func issueInto(t *testing.T, data, out, identity string, extra ...string) issuedFiles {
	t.Helper()
	stdout := mustCtl(t, data, append([]string{"issue", "--identity", identity, "--out-dir", out}, extra...)...)
	for _, name := range []string{"key.pem", "cert-chain.pem", "root-cert.pem"} {
		if !strings.Contains(stdout, filepath.Join(out, name)) {
			t.Errorf("issue output %q does not list %s", stdout, name)
		}
	}
	f, err := readIssued(out)
	if err != nil {
		t.Fatalf("issue %s: %v", identity, err)
	}
	return f
}

// checkWorkloadLeaf asserts the certificate profile of DESIGN.md §4.
func checkWorkloadLeaf(t *testing.T, leaf *x509.Certificate, identity string, ttl time.Duration) {
	t.Helper()
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != identity {
		t.Errorf("URI SANs %v, want exactly %s", leaf.URIs, identity)
	}
	if n := len(leaf.DNSNames) + len(leaf.IPAddresses) + len(leaf.EmailAddresses); n != 0 {
		t.Errorf("leaf has %d non-URI SANs", n)
	}
	for _, e := range leaf.Extensions {
		if e.Id.Equal(oidSubjectAltName) && !e.Critical {
			t.Errorf("SAN extension is not critical (subject is empty)")
		}
	}
	if leaf.Subject.String() != "" {
		t.Errorf("subject %q, want empty", leaf.Subject)
	}
	if !leaf.BasicConstraintsValid || leaf.IsCA {
		t.Errorf("leaf basic constraints: valid %v CA %v", leaf.BasicConstraintsValid, leaf.IsCA)
	}
	if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
		t.Errorf("ext key usage %v, want serverAuth, clientAuth", leaf.ExtKeyUsage)
	}
	if leaf.SerialNumber.BitLen() != 128 {
		t.Errorf("serial has %d bits, want 128", leaf.SerialNumber.BitLen())
	}
	if ttl > 0 {
		// NotBefore is backdated by the 2 min clock-skew allowance.
		want := ttl + 2*time.Minute
		if got := leaf.NotAfter.Sub(leaf.NotBefore); got < want-time.Minute || got > want+time.Minute {
			t.Errorf("lifetime %s, want %s ± 1m", got, want)
		}
	}
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if err == nil {
		t.Fatalf("succeeded, want %s", code)
	}
	if got := status.Code(err); got != code {
		t.Errorf("error %v has code %s, want %s", err, got, code)
	}
	if !strings.Contains(err.Error(), code.String()) {
		t.Errorf("error %q does not name the code %s", err, code)
	}
}

func findRecord(recs []storage.Record, match func(r storage.Record) bool) (storage.Record, bool) {
	for _, r := range recs {
		if match(r) {
			return r, true
		}
	}
	return storage.Record{}, false
}

// TestSelfSignedCA drives one default server through castellanctl: bundle,
// issuance, refusals, the audit log and operator authorization. Steps share
// the server and build on each other.
func TestSelfSignedCA(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	startServer(t, data)
	const sa1 = "spiffe://cluster.local/ns/ns1/sa/sa1"

	rootPEM := servetest.ReadFile(t, filepath.Join(data, datadir.RootCert))
	roots := servetest.ParseCerts(t, rootPEM)
	t.Run("bundle prints root-cert.pem", func(t *testing.T) {
		out := mustCtl(t, data, "bundle")
		if out != string(rootPEM) {
			t.Errorf("bundle output differs from root-cert.pem:\n%s\nvs\n%s", out, rootPEM)
		}
		ca := servetest.ParseCerts(t, servetest.ReadFile(t, filepath.Join(data, datadir.SelfSignedDir, "ca-cert.pem")))
		if len(roots) != 1 || !roots[0].Equal(ca[0]) {
			t.Errorf("bundle holds %d certificates, want the root of ca/ca-cert.pem", len(roots))
		}
	})

	var ecLeaf issuedFiles
	ecDir := filepath.Join(t.TempDir(), "ecdsa") // outlives the subtest: step 7 uses it
	t.Run("issue ecdsa", func(t *testing.T) {
		ecLeaf = issueInto(t, data, ecDir, sa1, "--ttl", "2h")
		leaf := ecLeaf.leaf()
		checkWorkloadLeaf(t, leaf, sa1, 2*time.Hour)
		if len(ecLeaf.chain) != 1 {
			t.Errorf("cert-chain.pem holds %d certificates; the self-signed root signs leaves directly", len(ecLeaf.chain))
		}
		if !bytes.Equal(ecLeaf.roots, rootPEM) {
			t.Errorf("out-dir root-cert.pem differs from the data dir's")
		}
		if err := verifyChain(ecLeaf.chain, roots); err != nil {
			t.Errorf("leaf does not verify against DATA/root-cert.pem: %v", err)
		}
		if _, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || leaf.KeyUsage != x509.KeyUsageDigitalSignature {
			t.Errorf("key %T usage %b, want ECDSA with digitalSignature only", leaf.PublicKey, leaf.KeyUsage)
		}
		if !bytes.Equal(leaf.AuthorityKeyId, roots[0].SubjectKeyId) {
			t.Errorf("AuthorityKeyId %x, want the root's SubjectKeyId %x", leaf.AuthorityKeyId, roots[0].SubjectKeyId)
		}
	})
	if ecLeaf.chain == nil {
		t.FailNow()
	}

	t.Run("issue rsa-2048", func(t *testing.T) {
		const id = "spiffe://cluster.local/ns/ns1/sa/rsa"
		f := issue(t, data, id, "--key-type", "rsa-2048")
		leaf := f.leaf()
		checkWorkloadLeaf(t, leaf, id, 24*time.Hour) // the default TTL
		pub, ok := leaf.PublicKey.(*rsa.PublicKey)
		if !ok || pub.N.BitLen() != 2048 {
			t.Fatalf("leaf key %T, want RSA-2048", leaf.PublicKey)
		}
		if leaf.KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment {
			t.Errorf("RSA leaf key usage %b, want digitalSignature|keyEncipherment", leaf.KeyUsage)
		}
	})

	refusals := []struct {
		name     string
		identity string
		args     []string
		code     codes.Code
		reason   string
	}{
		{name: "other trust domain", identity: "spiffe://example.org/ns/ns1/sa/sa1", code: codes.InvalidArgument, reason: "authz.bad_identity"},
		{name: "operator identity is never mintable", identity: operatorID, code: codes.InvalidArgument, reason: "authz.bad_identity"},
		{name: "path-like name cannot forge an ID", identity: "spiffe://cluster.local/ns/a/sa/b/sa/c", code: codes.InvalidArgument, reason: "authz.bad_identity"},
		{name: "not a SPIFFE ID", identity: "https://cluster.local/ns/ns1/sa/sa1", code: codes.InvalidArgument, reason: "authz.bad_identity"},
		{name: "TTL over 90 days", identity: "spiffe://cluster.local/ns/ns1/sa/long", args: []string{"--ttl", "2161h"}, code: codes.InvalidArgument, reason: "ttl.too_long"},
	}
	for _, tc := range refusals {
		t.Run("refused/"+tc.name, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "out")
			_, _, err := ctl(data, append([]string{"issue", "--identity", tc.identity, "--out-dir", out}, tc.args...)...)
			wantCode(t, err, tc.code)
			if _, err := os.Stat(out); !os.IsNotExist(err) {
				t.Errorf("a refused issue wrote %s (stat: %v)", out, err)
			}
		})
	}
	t.Run("refused/missing identity", func(t *testing.T) {
		_, _, err := ctl(data, "issue", "--out-dir", filepath.Join(t.TempDir(), "out"))
		if err == nil || !strings.Contains(err.Error(), "--identity") {
			t.Errorf("issue without --identity: %v, want an error naming --identity", err)
		}
	})

	t.Run("audit list json", func(t *testing.T) {
		recs := auditRecords(t, data)
		leaf := ecLeaf.leaf()
		serial := fmt.Sprintf("%x", leaf.SerialNumber)
		r, ok := findRecord(recs, func(r storage.Record) bool { return r.Serial == serial })
		if !ok {
			t.Fatalf("no audit record with serial %s among %d", serial, len(recs))
		}
		sum := sha256.Sum256(leaf.Raw)
		if r.Kind != storage.KindCSR || r.Outcome != storage.OutcomeIssued || r.Code != "OK" || r.AuthMethod != "operator" ||
			r.Caller != operatorID || r.GrantedIdentity != sa1 || r.RequestedIdentity != sa1 || r.Signer != "selfsigned" ||
			r.CertSHA256 != hex.EncodeToString(sum[:]) || !r.NotAfter.Equal(leaf.NotAfter) || !r.NotBefore.Equal(leaf.NotBefore) ||
			r.IssuerKeyID != hex.EncodeToString(roots[0].SubjectKeyId) || r.RequestID == "" || r.Peer == "" || r.Hash == "" {
			t.Errorf("issued record = %+v", r)
		}
		for _, tc := range refusals {
			r, ok := findRecord(recs, func(r storage.Record) bool { return r.RequestedIdentity == tc.identity })
			if !ok {
				t.Errorf("%s: no audit record requesting %s", tc.name, tc.identity)
				continue
			}
			if r.Outcome != storage.OutcomeRefused || r.Code != tc.code.String() || r.Reason != tc.reason || r.Serial != "" ||
				r.AuthMethod != "operator" {
				t.Errorf("%s: record = %+v, want refused %s %s", tc.name, r, tc.code, tc.reason)
			}
		}
		for i, r := range recs {
			if r.Seq != uint64(i+1) || r.Writer != recs[0].Writer {
				t.Errorf("record %d: seq %d writer %s, want one chain numbered from 1", i, r.Seq, r.Writer)
			}
		}
	})

	t.Run("audit list filters", func(t *testing.T) {
		all := auditRecords(t, data)
		byID := auditRecords(t, data, "--identity", sa1)
		if len(byID) != 1 || byID[0].Serial != fmt.Sprintf("%x", ecLeaf.leaf().SerialNumber) {
			t.Errorf("--identity %s: %d records %+v, want the one issuance", sa1, len(byID), byID)
		}
		refused := auditRecords(t, data, "--outcome", "refused")
		if len(refused) != len(refusals) {
			t.Errorf("--outcome refused: %d records, want %d", len(refused), len(refusals))
		}
		for _, r := range refused {
			if r.Outcome != storage.OutcomeRefused {
				t.Errorf("--outcome refused returned %+v", r)
			}
		}
		one := auditRecords(t, data, "--limit", "1")
		if len(one) != 1 || one[0].Hash != all[0].Hash {
			t.Errorf("--limit 1: %+v, want the first record", one)
		}
		bySerial := auditRecords(t, data, "--serial", fmt.Sprintf("%x", ecLeaf.leaf().SerialNumber))
		if len(bySerial) != 1 || bySerial[0].GrantedIdentity != sa1 {
			t.Errorf("--serial: %+v", bySerial)
		}
	})

	t.Run("audit list table", func(t *testing.T) {
		out := mustCtl(t, data, "audit", "list")
		lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
		if !strings.HasPrefix(lines[0], "SEQ") || !strings.Contains(lines[0], "OUTCOME") || !strings.Contains(lines[0], "SERIAL") {
			t.Errorf("table header %q", lines[0])
		}
		if n := len(auditRecords(t, data)); len(lines) != n+1 {
			t.Errorf("table has %d rows, want %d", len(lines)-1, n)
		}
		if !strings.Contains(out, fmt.Sprintf("%x", ecLeaf.leaf().SerialNumber)) {
			t.Errorf("table lacks the issued serial:\n%s", out)
		}
	})

	t.Run("workload certificate is not an operator", func(t *testing.T) {
		creds := []string{"--cert", filepath.Join(ecLeaf.dir, "cert-chain.pem"), "--key", filepath.Join(ecLeaf.dir, "key.pem")}
		for _, args := range [][]string{
			{"bundle"},
			{"audit", "list"},
			{"audit", "verify"},
			{"issue", "--identity", sa1, "--out-dir", filepath.Join(t.TempDir(), "out")},
		} {
			_, _, err := ctl(data, append(creds, args...)...)
			wantCode(t, err, codes.PermissionDenied)
		}
		r, ok := findRecord(auditRecords(t, data), func(r storage.Record) bool { return r.Caller == sa1 })
		if !ok || r.AuthMethod != "mtls" || r.Outcome != storage.OutcomeRefused || r.Code != "PermissionDenied" || r.Reason != "authz.not_operator" {
			t.Errorf("audit of the workload's issue attempt: %+v (found %v)", r, ok)
		}
	})

	t.Run("audit verify intact", func(t *testing.T) {
		out := mustCtl(t, data, "audit", "verify")
		if !strings.Contains(out, "intact") {
			t.Errorf("audit verify: %q", out)
		}
	})
}

// TestRestartAndTamper restarts a server on the same data directory (same
// root, same operator credential, one continuing audit chain), then edits the
// audit store behind its back and expects `audit verify` to name the record.
func TestRestartAndTamper(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	const id = "spiffe://cluster.local/ns/restart/sa/app"
	persisted := []string{
		filepath.Join(data, datadir.SelfSignedDir, "ca-cert.pem"),
		filepath.Join(data, datadir.SelfSignedDir, datadir.CAState),
		filepath.Join(data, datadir.RootCert),
		filepath.Join(data, datadir.OperatorDir, datadir.OperatorCert),
		filepath.Join(data, datadir.OperatorDir, datadir.OperatorKey),
	}
	snapshot := func() map[string][]byte {
		m := map[string][]byte{}
		for _, p := range persisted {
			m[p] = servetest.ReadFile(t, p)
		}
		return m
	}

	s := startServer(t, data)
	first := issue(t, data, id, "--ttl", "1h")
	before := snapshot()
	bundle := mustCtl(t, data, "bundle")
	recs1 := auditRecords(t, data)
	if out := mustCtl(t, data, "audit", "verify"); !strings.Contains(out, "intact") {
		t.Fatalf("audit verify: %q", out)
	}
	if err := s.stop(); err != nil { // SIGTERM must exit 0
		t.Fatalf("first server: %v", err)
	}

	s = startServer(t, data)
	for p, b := range snapshot() {
		if !bytes.Equal(b, before[p]) {
			t.Errorf("%s changed across a restart", p)
		}
	}
	if got := mustCtl(t, data, "bundle"); got != bundle {
		t.Errorf("bundle changed across a restart")
	}
	if err := verifyChain(first.chain, servetest.ParseCerts(t, []byte(bundle))); err != nil {
		t.Errorf("a certificate from before the restart no longer verifies: %v", err)
	}
	second := issue(t, data, id, "--ttl", "1h")
	recs2 := auditRecords(t, data)
	if len(recs2) <= len(recs1)+1 {
		t.Fatalf("%d records after restart and issuance, had %d before", len(recs2), len(recs1))
	}
	for i, r := range recs2 {
		if r.Seq != uint64(i+1) || r.Writer != recs1[0].Writer {
			t.Errorf("record %d: seq %d writer %s; want one chain %s numbered from 1", i, r.Seq, r.Writer, recs1[0].Writer)
		}
		if i < len(recs1) && r.Hash != recs1[i].Hash {
			t.Errorf("record seq %d changed across the restart", r.Seq)
		}
	}
	if recs2[len(recs1)].PrevHash != recs1[len(recs1)-1].Hash {
		t.Errorf("first record after restart does not chain to the last before it")
	}
	if _, ok := findRecord(recs2[len(recs1):], func(r storage.Record) bool {
		return r.Serial == fmt.Sprintf("%x", second.leaf().SerialNumber)
	}); !ok {
		t.Errorf("no record of the issuance after restart")
	}
	if out := mustCtl(t, data, "audit", "verify"); !strings.Contains(out, "intact") {
		t.Fatalf("audit verify after restart: %q", out)
	}
	if err := s.stop(); err != nil {
		t.Fatalf("second server: %v", err)
	}

	// Rewrite who got the first certificate, leaving the stored hashes alone.
	db, err := sql.Open("sqlite", filepath.Join(data, datadir.AuditDB))
	if err != nil {
		t.Fatal(err)
	}
	res, err := db.Exec(`UPDATE audit_log SET granted_identity = 'spiffe://cluster.local/ns/evil/sa/evil' WHERE serial = ?`,
		fmt.Sprintf("%x", first.leaf().SerialNumber))
	if err != nil {
		t.Fatal(err)
	}
	if n, err := res.RowsAffected(); err != nil || n != 1 {
		t.Fatalf("tampering updated %d rows (%v), want 1", n, err)
	}
	var seq uint64
	if err := db.QueryRow(`SELECT seq FROM audit_log WHERE serial = ?`, fmt.Sprintf("%x", first.leaf().SerialNumber)).Scan(&seq); err != nil {
		t.Fatal(err)
	}
	if err := db.Close(); err != nil {
		t.Fatal(err)
	}

	startServer(t, data)
	out, _, err := ctl(data, "audit", "verify")
	var ee exitError
	if !errors.As(err, &ee) || ee.code != 1 {
		t.Fatalf("audit verify of a tampered log: %v, want exit 1", err)
	}
	if !strings.Contains(out, "BROKEN") || !strings.Contains(out, fmt.Sprintf("seq %d:", seq)) {
		t.Errorf("audit verify output %q does not name seq %d", out, seq)
	}
	// doctor finds it too: in the tail it verifies, and with --full.
	for _, args := range [][]string{{"doctor"}, {"doctor", "--full"}} {
		out, _, err := ctl(data, args...)
		if !errors.As(err, &ee) || ee.code != 1 {
			t.Errorf("%v on a tampered log: %v, want exit 1\n%s", args, err, out)
		}
		if line := doctorLine(t, out, checkAudit); !strings.HasPrefix(line, "FAIL") || !strings.Contains(line, fmt.Sprintf("seq %d: ", seq)) ||
			!strings.Contains(line, "hash mismatch") || !strings.Contains(line, "-- fix: the audit store was edited outside Castellan") {
			t.Errorf("%v: audit line %q, want a FAIL naming seq %d", args, line, seq)
		}
	}
}

// TestIntermediateHotReload swaps the cacerts directory under a running
// intermediate signer (root A → A1, then root B → B1) while clients keep
// issuing, then offers an invalid set, which must be ignored.
func TestIntermediateHotReload(t *testing.T) {
	rootA := newCA(t, "Root A", nil)
	a1 := newCA(t, "Intermediate A1", rootA)
	rootB := newCA(t, "Root B", nil)
	b1 := newCA(t, "Intermediate B1", rootB)
	wrongKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	base := t.TempDir()
	writeCACerts(t, filepath.Join(base, "gen1"), rootA, a1, nil)
	writeCACerts(t, filepath.Join(base, "gen2"), rootB, b1, nil)
	writeCACerts(t, filepath.Join(base, "gen3"), rootB, b1, wrongKey) // key does not match B1
	cacerts := filepath.Join(base, "cacerts")
	if err := os.Symlink("gen1", cacerts); err != nil {
		t.Fatal(err)
	}

	data := filepath.Join(t.TempDir(), "data")
	s := startServer(t, data, "--signer", "intermediate", "--cacerts-dir", cacerts, "--cacerts-poll-interval", "200ms")
	const id = "spiffe://cluster.local/ns/reload/sa/app"

	issuedBy := func(f issuedFiles, inter *testCA) error {
		if len(f.chain) != 2 || !f.chain[1].Equal(inter.cert) {
			return fmt.Errorf("chain of %d certificates, want [leaf, %s]", len(f.chain), inter.cert.Subject.CommonName)
		}
		return f.leaf().CheckSignatureFrom(inter.cert)
	}
	bundleRoots := func() []*x509.Certificate {
		return servetest.ParseCerts(t, []byte(mustCtl(t, data, "bundle")))
	}

	before := issue(t, data, id, "--ttl", "1h")
	if err := issuedBy(before, a1); err != nil {
		t.Fatalf("before the swap: %v", err)
	}
	if roots := bundleRoots(); len(roots) != 1 || !roots[0].Equal(rootA.cert) {
		t.Fatalf("bundle before the swap holds %d roots, want root A", len(roots))
	}

	// Clients issue continuously across the swap; every attempt must succeed.
	var (
		mu        sync.Mutex
		succeeded int
		failures  []string
		stop      = make(chan struct{})
		wg        sync.WaitGroup
	)
	loopDir := t.TempDir()
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				out := filepath.Join(loopDir, fmt.Sprintf("w%d-%d", w, i))
				_, errOut, err := ctl(data, "issue", "--identity", id, "--out-dir", out, "--ttl", "1h")
				if err == nil {
					_, err = readIssued(out)
				}
				mu.Lock()
				if err != nil {
					failures = append(failures, fmt.Sprintf("worker %d attempt %d: %v %s", w, i, err, errOut))
				} else {
					succeeded++
				}
				mu.Unlock()
			}
		}()
	}
	stopLoop := func() {
		select {
		case <-stop:
		default:
			close(stop)
			wg.Wait()
		}
	}
	t.Cleanup(stopLoop)
	successes := func() int { mu.Lock(); defer mu.Unlock(); return succeeded }
	atLeast := func(n int) func() error {
		return func() error {
			if got := successes(); got < n {
				return fmt.Errorf("%d successful issues, want %d", got, n)
			}
			return nil
		}
	}
	eventually(t, 20*time.Second, "issue loop running", atLeast(2))

	swapLink(t, cacerts, "gen2")
	eventually(t, 20*time.Second, "issuance switches to B1", func() error {
		return issuedBy(issue(t, data, id, "--ttl", "1h"), b1)
	})
	// A client that has not learnt root B yet (an Istio agent with the old
	// istio-ca-root-cert ConfigMap) must still be able to reach the CA: the
	// serving certificate may not jump to a chain under a root nobody has.
	rootAOnly := filepath.Join(base, "root-a.pem")
	if err := os.WriteFile(rootAOnly, pemCert(rootA.cert), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ctl(data, "--ca", rootAOnly, "bundle"); err != nil {
		t.Errorf("a client trusting only root A is locked out after the swap: %v", err)
	}
	eventually(t, 20*time.Second, "issue loop continues after the swap", atLeast(successes()+4))
	stopLoop()
	if len(failures) > 0 {
		t.Errorf("%d of %d issues failed across the swap:\n%s", len(failures), len(failures)+succeeded, strings.Join(failures, "\n"))
	}

	// The old root stays trusted: certificates issued under it are still live.
	roots := bundleRoots()
	if len(roots) != 2 || !containsCert(roots, rootA.cert) || !containsCert(roots, rootB.cert) {
		t.Errorf("bundle after the swap holds %d roots, want roots A and B", len(roots))
	}
	if err := verifyChain(before.chain, roots); err != nil {
		t.Errorf("a certificate issued by A1 no longer verifies against the bundle: %v", err)
	}
	eventually(t, 10*time.Second, "DATA/root-cert.pem holds both roots", func() error {
		if got := mustCtl(t, data, "bundle"); string(servetest.ReadFile(t, filepath.Join(data, datadir.RootCert))) != got {
			return errors.New("root-cert.pem differs from the served bundle")
		}
		return nil
	})
	reload, ok := findRecord(auditRecords(t, data), func(r storage.Record) bool {
		return r.Kind == storage.KindOperator && strings.Contains(r.Detail, "reloaded") && strings.Contains(r.Detail, "Intermediate B1")
	})
	if !ok || reload.Outcome != storage.OutcomeOK || reload.Signer != "intermediate" {
		t.Errorf("audit record of the reload: %+v (found %v)", reload, ok)
	}

	// An invalid set is reported and ignored: B1 keeps signing.
	const invalid = "new material is invalid"
	n := strings.Count(s.logs.String(), invalid)
	swapLink(t, cacerts, "gen3")
	eventually(t, 20*time.Second, "invalid set noticed", func() error {
		if strings.Count(s.logs.String(), invalid) <= n {
			return errors.New("not logged yet")
		}
		return nil
	})
	if err := issuedBy(issue(t, data, id, "--ttl", "1h"), b1); err != nil {
		t.Errorf("after an invalid set: %v", err)
	}
	if roots := bundleRoots(); len(roots) != 2 {
		t.Errorf("bundle after an invalid set holds %d roots, want 2", len(roots))
	}
}

// TestServeBinaryInvalidConfig checks the real binary's exit status and
// message for a configuration it cannot run.
func TestServeBinaryInvalidConfig(t *testing.T) {
	cmd := exec.Command(castellanBinary(t), "serve", "--data-dir", t.TempDir(), "--listen", "127.0.0.1:0",
		"--monitoring-listen", "127.0.0.1:0", "--signer", "nope")
	var stderr servetest.SyncBuffer
	cmd.Stderr = &stderr
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var xe *exec.ExitError
		if !errors.As(err, &xe) || xe.ExitCode() == 0 {
			t.Fatalf("castellan serve --signer nope: %v, want a non-zero exit", err)
		}
	case <-time.After(startTimeout):
		if err := cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
			t.Fatalf("castellan serve --signer nope still running after %s; kill: %v", startTimeout, err)
		}
		<-done
		t.Fatalf("castellan serve --signer nope still running after %s", startTimeout)
	}
	if !strings.Contains(stderr.String(), "signer") || !strings.Contains(stderr.String(), `"nope"`) {
		t.Errorf("stderr %q does not name the key and value", stderr.String())
	}
}
