package ca_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/storage"
)

func TestIssueGrant(t *testing.T) {
	key := leafKey("ecdsa-p256")
	p521, err := ecdsa.GenerateKey(elliptic.P521(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	grantOf := func(g ca.Grant) func(context.Context) (*ca.Grant, error) {
		return func(context.Context) (*ca.Grant, error) { return &g, nil }
	}
	const method, caller, peer = "kubernetes.test", "system:node:n1", "pcr/app/req-1"
	skew := signer.DefaultClockSkew
	for _, tc := range []struct {
		name      string
		opts      harnessOpts
		authorize func(context.Context) (*ca.Grant, error)
		// For refusals: the error kinds and the record's outcome and reason.
		wantKind    error
		wantOutcome string
		wantReason  string
		// For issuance: the leaf's names and validity (NotAfter−NotBefore).
		wantURI  string
		wantDNS  []string
		wantLife time.Duration
	}{
		{name: "workload identity, policy default", authorize: grantOf(ca.Grant{Identity: appID, PublicKey: key.Public()}),
			wantURI: appID.String(), wantLife: ca.DefaultTTL + skew},
		{name: "lifetime within the maximum lifetime, backdating included",
			authorize: grantOf(ca.Grant{Identity: appID, PublicKey: key.Public(), Lifetime: 48 * time.Hour, MaxLifetime: 48 * time.Hour}),
			wantURI:   appID.String(), wantLife: 48 * time.Hour},
		{name: "lifetime above the policy maximum is shortened, not refused",
			authorize: grantOf(ca.Grant{Identity: appID, PublicKey: key.Public(), Lifetime: 10 * 365 * 24 * time.Hour}),
			wantURI:   appID.String(), wantLife: ca.DefaultMaxTTL + skew},
		{name: "DNS names only", authorize: grantOf(ca.Grant{DNSNames: []string{"istiod.istio-system.svc"}, PublicKey: key.Public(), Lifetime: time.Hour}),
			wantDNS: []string{"istiod.istio-system.svc"}, wantLife: time.Hour + skew},
		{name: "refused by the controller", authorize: func(context.Context) (*ca.Grant, error) {
			return nil, ca.Refuse(ca.ErrPermissionDenied, "pod.gone", errors.New("pod deleted"))
		}, wantKind: ca.ErrPermissionDenied, wantOutcome: storage.OutcomeRefused, wantReason: "pod.gone"},
		{name: "key type outside the policy", authorize: grantOf(ca.Grant{Identity: appID, PublicKey: p521.Public()}),
			wantKind: ca.ErrKeyType, wantOutcome: storage.OutcomeRefused, wantReason: ca.ReasonKeyType},
		{name: "identity of another trust domain", authorize: grantOf(ca.Grant{Identity: foreignID, PublicKey: key.Public()}),
			wantKind: ca.ErrPermissionDenied, wantOutcome: storage.OutcomeRefused, wantReason: ca.ReasonBadIdentity},
		{name: "no names", authorize: grantOf(ca.Grant{PublicKey: key.Public()}),
			wantKind: ca.ErrInvalidRequest, wantOutcome: storage.OutcomeRefused, wantReason: ca.ReasonNoNames},
		{name: "maximum lifetime shorter than the backdating",
			authorize: grantOf(ca.Grant{Identity: appID, PublicKey: key.Public(), MaxLifetime: time.Minute}),
			wantKind:  ca.ErrInvalidRequest, wantOutcome: storage.OutcomeRefused, wantReason: ca.ReasonTTL},
		{name: "leaf cut short by its CA is withheld", opts: harnessOpts{rootNotAfter: testNow.Add(30 * time.Minute)},
			authorize: grantOf(ca.Grant{Identity: appID, PublicKey: key.Public(), MinLifetime: time.Hour}),
			wantKind:  ca.ErrInternal, wantOutcome: storage.OutcomeFailed, wantReason: ca.ReasonShortLifetime},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := newHarness(t, tc.opts)
			out, err := h.issuer.IssueGrant(context.Background(), ca.GrantRequest{Method: method, Caller: caller, Peer: peer,
				ClusterID: testCluster, Requested: appID.String(), Authorize: tc.authorize})
			rec := h.onlyRecord(t)
			if rec.Kind != storage.KindCSR || rec.AuthMethod != method || rec.Caller != caller || rec.Peer != peer ||
				rec.ClusterID != testCluster || rec.RequestedIdentity != appID.String() {
				t.Errorf("record = %+v, want kind csr, method %s, caller %s, peer %s, cluster %s, requested %s",
					rec, method, caller, peer, testCluster, appID)
			}
			if tc.wantKind != nil {
				if !errors.Is(err, tc.wantKind) || out != nil {
					t.Fatalf("IssueGrant = %v, %v; want an error wrapping %v and no certificate", out, err, tc.wantKind)
				}
				if rec.Outcome != tc.wantOutcome || rec.Reason != tc.wantReason || rec.Serial != "" {
					t.Errorf("record outcome %q reason %q serial %q, want %q %q and no serial", rec.Outcome, rec.Reason, rec.Serial, tc.wantOutcome, tc.wantReason)
				}
				return
			}
			if err != nil {
				t.Fatalf("IssueGrant: %v", err)
			}
			leaf := out.Chain.Leaf
			var uris []string
			for _, u := range leaf.URIs {
				uris = append(uris, u.String())
			}
			if want := []string{tc.wantURI}; tc.wantURI != "" && !slices.Equal(uris, want) || tc.wantURI == "" && len(uris) != 0 {
				t.Errorf("leaf URIs = %v, want %q", uris, tc.wantURI)
			}
			if !slices.Equal(leaf.DNSNames, tc.wantDNS) {
				t.Errorf("leaf DNS names = %v, want %v", leaf.DNSNames, tc.wantDNS)
			}
			if got := leaf.NotAfter.Sub(leaf.NotBefore); got != tc.wantLife {
				t.Errorf("leaf lifetime = %s, want %s", got, tc.wantLife)
			}
			if !leaf.NotBefore.Equal(testNow.Add(-skew)) {
				t.Errorf("NotBefore = %s, want now-%s", leaf.NotBefore, skew)
			}
			if len(leaf.Subject.Names) != 0 || leaf.IsCA || !slices.Equal(leaf.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}) {
				t.Errorf("leaf profile: subject %q, CA %v, EKU %v", leaf.Subject, leaf.IsCA, leaf.ExtKeyUsage)
			}
			if err := leaf.CheckSignatureFrom(h.root.Cert); err != nil {
				t.Errorf("leaf not signed by the CA: %v", err)
			}
			if rec.Outcome != storage.OutcomeIssued || rec.Serial != leaf.SerialNumber.Text(16) || rec.Signer != "selfsigned" ||
				rec.Hash != out.Record.Hash {
				t.Errorf("record %+v does not describe the issued leaf %x", rec, leaf.SerialNumber)
			}
			if want := appID.String(); tc.wantURI == "" {
				if want = "dns:" + tc.wantDNS[0]; rec.GrantedIdentity != want {
					t.Errorf("granted identity = %q, want %q", rec.GrantedIdentity, want)
				}
			} else if rec.GrantedIdentity != want {
				t.Errorf("granted identity = %q, want %q", rec.GrantedIdentity, want)
			}
		})
	}
}

// TestIssueGrantAuditDown checks that a grant whose record cannot be
// committed yields no certificate.
func TestIssueGrantAuditDown(t *testing.T) {
	key := leafKey("ecdsa-p256")
	h := newHarness(t, harnessOpts{wrapAudit: func(ca.AuditLog) ca.AuditLog { return failingAudit{err: errors.New("disk full")} }})
	out, err := h.issuer.IssueGrant(context.Background(), ca.GrantRequest{Method: "kubernetes.test",
		Authorize: func(context.Context) (*ca.Grant, error) {
			return &ca.Grant{Identity: appID, PublicKey: key.Public()}, nil
		}})
	if !errors.Is(err, ca.ErrUnavailable) || out != nil {
		t.Fatalf("IssueGrant with the audit store down = %v, %v; want ErrUnavailable and no certificate", out, err)
	}
	if ca.ReasonOf(err) != ca.ReasonAuditDown {
		t.Errorf("reason = %q, want %q", ca.ReasonOf(err), ca.ReasonAuditDown)
	}
}

// TestIssueGrantIdentityScope checks that the grant's SPIFFE ID, not the
// requested string, is what the leaf carries.
func TestIssueGrantIdentityScope(t *testing.T) {
	key := leafKey("ecdsa-p256")
	h := newHarness(t, harnessOpts{})
	granted := spiffeid.RequireFromPath(td, "/ns/default/sa/granted")
	out, err := h.issuer.IssueGrant(context.Background(), ca.GrantRequest{Method: "kubernetes.test", Requested: "spiffe://cluster.local/ns/kube-system/sa/admin",
		Authorize: func(context.Context) (*ca.Grant, error) {
			return &ca.Grant{Identity: granted, PublicKey: key.Public()}, nil
		}})
	if err != nil {
		t.Fatal(err)
	}
	if got := out.Chain.Leaf.URIs[0].String(); got != granted.String() {
		t.Errorf("leaf URI = %s, want the granted %s", got, granted)
	}
}
