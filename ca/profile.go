package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"fmt"
	"math/big"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Profile defaults from DESIGN.md §4.
const (
	DefaultTTL    = 24 * time.Hour
	DefaultMaxTTL = 90 * 24 * time.Hour
)

// TTLMode says what happens to a requested lifetime above the maximum.
type TTLMode string

// TTL modes: refuse the request (default) or shorten the lifetime to the maximum.
const (
	TTLRefuse TTLMode = "refuse"
	TTLClamp  TTLMode = "clamp"
)

// TTLPolicy turns the lifetime a client asked for into the one it gets.
type TTLPolicy struct {
	Default time.Duration
	Max     time.Duration
	Mode    TTLMode
}

// Grant returns the lifetime for a request of requestedSeconds: ≤ 0 means the
// default, as in Istio; above Max is refused or clamped according to Mode.
func (p TTLPolicy) Grant(requestedSeconds int64) (time.Duration, error) {
	def, max := p.Default, p.Max
	if def <= 0 {
		def = DefaultTTL
	}
	if max <= 0 {
		max = DefaultMaxTTL
	}
	if def > max {
		def = max
	}
	if requestedSeconds <= 0 {
		return def, nil
	}
	if requestedSeconds > int64(max/time.Second) {
		if p.Mode == TTLClamp {
			return max, nil
		}
		return 0, fmt.Errorf("%w: requested validity %ds exceeds the maximum %s", ErrTTLTooLong, requestedSeconds, max)
	}
	return time.Duration(requestedSeconds) * time.Second, nil
}

// CheckPublicKey accepts the workload key types of DESIGN.md §4 and refuses the rest.
func CheckPublicKey(pub crypto.PublicKey) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve == elliptic.P256() || k.Curve == elliptic.P384() {
			return nil
		}
		return fmt.Errorf("%w: ECDSA curve %s", ErrKeyType, k.Curve.Params().Name)
	case *rsa.PublicKey:
		if n := k.N.BitLen(); n < 2048 || n > 4096 {
			return fmt.Errorf("%w: RSA key of %d bits (want 2048-4096)", ErrKeyType, n)
		}
		return nil
	case ed25519.PublicKey:
		return nil
	default:
		return fmt.Errorf("%w: %T", ErrKeyType, pub)
	}
}

// LeafTemplate builds the workload certificate profile of DESIGN.md §4: empty
// subject (so Go marks the SAN critical), one URI SAN, digitalSignature
// (+keyEncipherment for RSA), serverAuth+clientAuth, CA:false.
func LeafTemplate(id spiffeid.ID, pub crypto.PublicKey, serial *big.Int, notBefore, notAfter time.Time) *x509.Certificate {
	usage := x509.KeyUsageDigitalSignature
	if _, ok := pub.(*rsa.PublicKey); ok {
		usage |= x509.KeyUsageKeyEncipherment
	}
	return &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             notBefore.UTC(),
		NotAfter:              notAfter.UTC(),
		URIs:                  []*url.URL{id.URL()},
		KeyUsage:              usage,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
}
