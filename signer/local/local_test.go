package local_test

import (
	"bytes"
	"context"
	"crypto/x509"
	"errors"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/signertest"
)

func TestNewValidation(t *testing.T) {
	now := time.Now()
	root := signertest.NewRoot(t, "root", signertest.CertOptions{})
	otherRoot := signertest.NewRoot(t, "other root", signertest.CertOptions{})
	mid := root.NewIntermediate(t, "mid", signertest.CertOptions{})
	issuing := mid.NewIntermediate(t, "issuing", signertest.CertOptions{})

	tests := []struct {
		name    string
		cfg     func() local.Config
		wantErr error // nil: New succeeds
	}{
		{"self-signed root", func() local.Config {
			return local.Config{Cert: root.Cert, Key: root.Key, Roots: []*x509.Certificate{root.Cert}}
		}, nil},
		{"two-level intermediate", func() local.Config {
			return local.Config{Cert: issuing.Cert, Key: issuing.Key, Intermediates: []*x509.Certificate{mid.Cert}, Roots: []*x509.Certificate{otherRoot.Cert, root.Cert}}
		}, nil},
		{"key mismatch", func() local.Config {
			return local.Config{Cert: mid.Cert, Key: issuing.Key, Roots: []*x509.Certificate{root.Cert}}
		}, local.ErrKeyMismatch},
		{"not a CA", func() local.Config {
			c := root.NewIntermediate(t, "leafish", signertest.CertOptions{Modify: func(c *x509.Certificate) { c.IsCA = false }})
			return local.Config{Cert: c.Cert, Key: c.Key, Roots: []*x509.Certificate{root.Cert}}
		}, local.ErrNotCA},
		{"no certSign", func() local.Config {
			c := root.NewIntermediate(t, "no certsign", signertest.CertOptions{Modify: func(c *x509.Certificate) { c.KeyUsage = x509.KeyUsageDigitalSignature }})
			return local.Config{Cert: c.Cert, Key: c.Key, Roots: []*x509.Certificate{root.Cert}}
		}, local.ErrNotCA},
		{"chain not to roots", func() local.Config {
			return local.Config{Cert: mid.Cert, Key: mid.Key, Roots: []*x509.Certificate{otherRoot.Cert}}
		}, local.ErrUntrustedChain},
		{"missing intermediate", func() local.Config {
			return local.Config{Cert: issuing.Cert, Key: issuing.Key, Roots: []*x509.Certificate{root.Cert}}
		}, local.ErrUntrustedChain},
		{"intermediates out of order", func() local.Config {
			return local.Config{Cert: issuing.Cert, Key: issuing.Key, Intermediates: []*x509.Certificate{root.Cert, mid.Cert}, Roots: []*x509.Certificate{root.Cert}}
		}, local.ErrUntrustedChain},
		{"no roots", func() local.Config {
			return local.Config{Cert: mid.Cert, Key: mid.Key}
		}, local.ErrUntrustedChain},
		{"expired CA", func() local.Config {
			c := root.NewIntermediate(t, "expired", signertest.CertOptions{NotBefore: now.Add(-48 * time.Hour), NotAfter: now.Add(-time.Hour)})
			return local.Config{Cert: c.Cert, Key: c.Key, Roots: []*x509.Certificate{root.Cert}}
		}, local.ErrExpired},
		{"expired at the injected clock", func() local.Config {
			return local.Config{Cert: mid.Cert, Key: mid.Key, Roots: []*x509.Certificate{root.Cert}, Now: func() time.Time { return now.Add(2 * 365 * 24 * time.Hour) }}
		}, local.ErrExpired},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := local.New(tc.cfg())
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("New: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("New: err = %v, want %v", err, tc.wantErr)
			}
			if s != nil {
				t.Error("New returned a signer with an error")
			}
		})
	}
}

func TestSignChainAndClamp(t *testing.T) {
	root := signertest.NewRoot(t, "root", signertest.CertOptions{})
	mid := root.NewIntermediate(t, "mid", signertest.CertOptions{})
	issuing := mid.NewIntermediate(t, "issuing", signertest.CertOptions{})
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")
	key := signertest.Key(0)

	tests := []struct {
		name      string
		cfg       local.Config
		wantChain []*x509.Certificate
	}{
		{"root signs directly", local.Config{Cert: root.Cert, Key: root.Key, Roots: []*x509.Certificate{root.Cert}}, nil},
		{"intermediate", local.Config{Cert: issuing.Cert, Key: issuing.Key, Intermediates: []*x509.Certificate{mid.Cert}, Roots: []*x509.Certificate{root.Cert}},
			[]*x509.Certificate{issuing.Cert, mid.Cert}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s, err := local.New(tc.cfg)
			if err != nil {
				t.Fatal(err)
			}
			serial, _ := signer.NewSerial(bytes.NewReader(make([]byte, 16)))
			now := time.Now().Truncate(time.Second)
			tmpl := ca.LeafTemplate(id, key.Public(), serial, now, now.Add(50*365*24*time.Hour))
			chain, err := s.Sign(t.Context(), signer.SignRequest{Template: tmpl, PublicKey: key.Public(), Identity: id})
			if err != nil {
				t.Fatal(err)
			}
			if len(chain.Intermediates) != len(tc.wantChain) {
				t.Fatalf("got %d intermediates, want %d", len(chain.Intermediates), len(tc.wantChain))
			}
			for i := range tc.wantChain {
				if !bytes.Equal(chain.Intermediates[i].Raw, tc.wantChain[i].Raw) {
					t.Errorf("Intermediates[%d] = %q, want %q", i, chain.Intermediates[i].Subject, tc.wantChain[i].Subject)
				}
			}
			if !chain.Leaf.NotAfter.Equal(tc.cfg.Cert.NotAfter) {
				t.Errorf("NotAfter = %s, want clamped to %s", chain.Leaf.NotAfter, tc.cfg.Cert.NotAfter)
			}
			if want := now.Add(50 * 365 * 24 * time.Hour); !tmpl.NotAfter.Equal(want) {
				t.Errorf("the caller's template changed: NotAfter %s, want %s", tmpl.NotAfter, want)
			}
			if !bytes.Equal(s.Certificate().Raw, tc.cfg.Cert.Raw) {
				t.Error("Certificate() is not the issuing CA")
			}
			// The flag lets the result check skip one verification, so it must be true.
			if !chain.SignatureChecked {
				t.Error("SignatureChecked not set by the in-process signer")
			}
			if err := chain.Leaf.CheckSignatureFrom(tc.cfg.Cert); err != nil {
				t.Errorf("leaf signature does not verify with the issuing CA: %v", err)
			}
		})
	}
}

func TestSignRefuses(t *testing.T) {
	root := signertest.NewRoot(t, "root", signertest.CertOptions{})
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b")
	key := signertest.Key(0)
	serial, _ := signer.NewSerial(bytes.NewReader(make([]byte, 16)))
	clock := time.Now()
	s, err := local.New(local.Config{Cert: root.Cert, Key: root.Key, Roots: []*x509.Certificate{root.Cert}, Now: func() time.Time { return clock }})
	if err != nil {
		t.Fatal(err)
	}
	after := root.Cert.NotAfter
	tests := []struct {
		name      string
		now       time.Time
		notBefore time.Time
	}{
		{"CA expired at now", after.Add(time.Second), after.Add(-time.Hour)},
		{"no validity left after clamping", clock, after},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clock = tc.now
			tmpl := ca.LeafTemplate(id, key.Public(), serial, tc.notBefore, tc.notBefore.Add(time.Hour))
			chain, err := s.Sign(context.Background(), signer.SignRequest{Template: tmpl, PublicKey: key.Public(), Identity: id})
			if err == nil || chain != nil {
				t.Fatalf("Sign = %v, %v; want an error and no certificate", chain, err)
			}
		})
	}
}

func TestConformance(t *testing.T) {
	root := signertest.NewRoot(t, "root", signertest.CertOptions{})
	issuing := root.NewIntermediate(t, "issuing", signertest.CertOptions{})
	signertest.Run(t, signertest.Factory{New: func(t *testing.T) signer.Signer {
		s, err := local.New(local.Config{Cert: issuing.Cert, Key: issuing.Key, Roots: []*x509.Certificate{root.Cert}})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}})
}
