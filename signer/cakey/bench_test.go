package cakey_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/kms/apiv1"
	"go.step.sm/crypto/kms/pkcs11"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/cakey/softhsmtest"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// benchKeys returns a CA key of keyType in the token and one in memory.
func benchKeys(b *testing.B, keyType string) map[string]crypto.Signer {
	b.Helper()
	p := softhsmtest.Get(b).Provider(b)
	id := make([]byte, 16)
	if _, err := rand.Read(id); err != nil {
		b.Fatal(err)
	}
	hsmKey, err := p.CreateKey(b.Context(), id, keyType)
	if err != nil {
		b.Fatal(err)
	}
	soft, err := keyfile.GenerateKey(keyType)
	if err != nil {
		b.Fatal(err)
	}
	// The same token key through the library alone, to show what the
	// provider's wrapper (timeouts, health, reconnection) costs.
	tk := softhsmtest.Get(b)
	km, err := pkcs11.New(b.Context(), apiv1.Options{Type: apiv1.PKCS11,
		URI: "pkcs11:module-path=" + tk.Module + ";token=" + softhsmtest.Label, Pin: softhsmtest.PIN})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = km.Close() })
	direct, err := km.CreateSigner(&apiv1.CreateSignerRequest{SigningKey: hsmKey.URI()})
	if err != nil {
		b.Fatal(err)
	}
	return map[string]crypto.Signer{"softhsm": hsmKey, "softhsm-library": direct, "memory": soft}
}

// parallel runs op b.N times over g goroutines and reports operations per
// second, since ns/op of a parallel run is wall time per operation.
func parallel(b *testing.B, g int, op func() error) {
	b.Helper()
	var wg sync.WaitGroup
	work := make(chan struct{}, b.N)
	for range b.N {
		work <- struct{}{}
	}
	close(work)
	start := time.Now()
	for range g {
		wg.Go(func() {
			for range work {
				if err := op(); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "ops/s")
}

// BenchmarkSign measures one CA signature (a SHA-256 digest) in SoftHSM2
// through the provider, through the library alone, and with the same key
// type in memory, from 1 to 8 goroutines: the session pool lets them run
// in parallel.
func BenchmarkSign(b *testing.B) {
	digest := sha256.Sum256([]byte("tbs certificate"))
	for _, keyType := range []string{keyfile.KeyTypeECDSAP256, keyfile.KeyTypeRSA2048} {
		keys := benchKeys(b, keyType)
		for _, where := range []string{"softhsm", "softhsm-library", "memory"} {
			for _, g := range []int{1, 2, 4, 8} {
				b.Run(fmt.Sprintf("%s/%s/goroutines=%d", keyType, where, g), func(b *testing.B) {
					parallel(b, g, func() error {
						_, err := keys[where].Sign(rand.Reader, digest[:], crypto.SHA256)
						return err
					})
				})
			}
		}
	}
}

// BenchmarkIssueLeaf measures what issuance spends in the signer: a
// workload leaf certified by a P-256 root whose key is in SoftHSM2 or in
// memory (x509.CreateCertificate, the signature, and its verification).
func BenchmarkIssueLeaf(b *testing.B) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	id := spiffeid.RequireFromPath(td, "/ns/bench/sa/workload")
	leafKey := signertest.Key(0)
	keys := benchKeys(b, keyfile.KeyTypeECDSAP256)
	for _, where := range []string{"softhsm", "memory"} {
		key := keys[where]
		now := time.Now()
		root, err := selfsigned.NewRoot(td, key, now.Add(-time.Hour), now.Add(time.Hour), rand.Reader)
		if err != nil {
			b.Fatal(err)
		}
		s, err := local.New(local.Config{Cert: root, Key: key, Roots: []*x509.Certificate{root}})
		if err != nil {
			b.Fatal(err)
		}
		for _, g := range []int{1, 2, 8, 32} {
			b.Run(fmt.Sprintf("%s/goroutines=%d", where, g), func(b *testing.B) {
				parallel(b, g, func() error {
					serial, err := signer.NewSerial(rand.Reader)
					if err != nil {
						return err
					}
					tmpl := signertest.Template(id, leafKey.Public(), serial, now.Add(-time.Minute), now.Add(30*time.Minute))
					_, err = s.Sign(context.Background(), signer.SignRequest{Template: tmpl, PublicKey: leafKey.Public(), Identity: id, TTL: 30 * time.Minute})
					return err
				})
			})
		}
	}
}
