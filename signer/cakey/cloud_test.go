package cakey_test

import (
	"crypto/x509"
	"encoding/hex"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/castellan-ca/castellan/internal/keyfile"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/signer/cakey"
	"github.com/castellan-ca/castellan/signer/cakey/kmsfake"
	"github.com/castellan-ca/castellan/signer/local"
	"github.com/castellan-ca/castellan/signer/selfsigned"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// cloudOpTimeout bounds a signature in the cloud tests: the client
// libraries retry an unavailable service for longer than a test should wait.
const cloudOpTimeout = time.Second

// cloudCase is one cloud KMS behind its fake.
type cloudCase struct {
	name string
	// start runs the fake and returns the provider config that reaches it
	// and a switch that takes it down (true) or brings it back (false).
	start func(t *testing.T) (cakey.Config, func(down bool))
	// keyURI is the form of the URI of a key made for id.
	keyURI func(id []byte) *regexp.Regexp
}

var cloudCases = []cloudCase{
	{
		name: "awskms",
		start: func(t *testing.T) (cakey.Config, func(bool)) {
			f := kmsfake.NewAWS(t)
			f.Env(t)
			return cakey.Config{URI: "awskms:region=eu-west-1"}, f.Down
		},
		keyURI: func([]byte) *regexp.Regexp {
			return regexp.MustCompile(`^awskms:key-id=[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)
		},
	},
	{
		name: "cloudkms",
		start: func(t *testing.T) (cakey.Config, func(bool)) {
			f := kmsfake.NewGoogle(t)
			return cakey.Config{URI: "cloudkms:key-ring=projects/castellan-test/locations/global/keyRings/castellan",
				GoogleClientOptions: f.ClientOptions()}, f.Down
		},
		keyURI: func(id []byte) *regexp.Regexp {
			return regexp.MustCompile(`^cloudkms:projects/castellan-test/locations/global/keyRings/castellan/cryptoKeys/castellan-` +
				hex.EncodeToString(id) + `/cryptoKeyVersions/1$`)
		},
	},
}

// TestCloudKMS drives go.step.sm/crypto/kms and the real client library of
// each cloud against its fake: keys made there (P-256 and RSA-2048) sign
// and verify, are found again by URI by another provider, and a root made
// with one passes the signer conformance suite, the fake's outage included.
func TestCloudKMS(t *testing.T) {
	for _, tc := range cloudCases {
		t.Run(tc.name, func(t *testing.T) {
			cfg, down := tc.start(t)
			cfg.RetryInterval, cfg.OpTimeout = retry, cloudOpTimeout
			p, err := cakey.New(t.Context(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = p.Close() })
			for _, keyType := range []string{keyfile.KeyTypeECDSAP256, keyfile.KeyTypeRSA2048} {
				id := newID(t)
				k, err := p.CreateKey(t.Context(), id, keyType)
				if err != nil {
					t.Fatalf("CreateKey %s: %v", keyType, err)
				}
				if !tc.keyURI(id).MatchString(k.URI()) {
					t.Errorf("key URI %q, want %s", k.URI(), tc.keyURI(id))
				}
				checkSigns(t, k, k.Public())
				other, err := cakey.New(t.Context(), cfg)
				if err != nil {
					t.Fatal(err)
				}
				reopened, err := other.Key(k.URI(), k.Public())
				if err != nil {
					t.Fatal(err)
				}
				checkSigns(t, reopened, k.Public())
				_ = other.Close()
			}

			key, err := p.CreateKey(t.Context(), newID(t), keyfile.KeyTypeECDSAP256)
			if err != nil {
				t.Fatal(err)
			}
			td := spiffeid.RequireTrustDomainFromString("cluster.local")
			now := time.Now()
			root, err := selfsigned.NewRoot(td, key, now.Add(-time.Hour), now.Add(24*time.Hour), nil)
			if err != nil {
				t.Fatal(err)
			}
			s, err := local.New(local.Config{Cert: root, Key: key, Roots: []*x509.Certificate{root}})
			if err != nil {
				t.Fatal(err)
			}
			signertest.Run(t, signertest.Factory{
				TrustDomain: td,
				New:         func(*testing.T) signer.Signer { return s },
				Outage: func(*testing.T, signer.Signer) func() {
					down(true)
					return func() { down(false) }
				},
			})
		})
	}
}

// TestAWSKeyNamed: an AWS key is named for the CA's key id in its alias
// (step adds the first 8 characters of the AWS key id).
func TestAWSKeyNamed(t *testing.T) {
	f := kmsfake.NewAWS(t)
	f.Env(t)
	p := newProvider(t, "awskms:region=eu-west-1")
	id := newID(t)
	k, err := p.CreateKey(t.Context(), id, keyfile.KeyTypeECDSAP384)
	if err != nil {
		t.Fatal(err)
	}
	awsID := strings.TrimPrefix(k.URI(), "awskms:key-id=")
	want := "alias/castellan-" + hex.EncodeToString(id) + "-" + awsID[:8]
	if got := f.Aliases(); got[want] != awsID {
		t.Errorf("aliases = %v, want %s → %s", got, want, awsID)
	}
}
