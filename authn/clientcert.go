package authn

import (
	"context"
	"crypto/x509"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// ClientCert authenticates a caller by the TLS client certificate it presented:
// the chain must verify to our current trust bundle for client auth, and the leaf
// must carry exactly one URI SAN, a workload ID of our trust domain (which the
// caller may then renew) or one of the operator IDs.
//
// The TLS layer only requests the certificate; verifying here means a bad
// certificate becomes an audited Unauthenticated refusal, not an opaque handshake error.
type ClientCert struct {
	TrustDomain spiffeid.TrustDomain
	// Roots returns the current trust bundle; called per request so rotation applies at once.
	Roots func() *x509.CertPool
	// Operators are the IDs of operator credentials (castellanctl).
	Operators []spiffeid.ID
}

// Authenticate implements Authenticator.
func (a *ClientCert) Authenticate(ctx context.Context) (*Caller, error) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return nil, ErrNoCredentials
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return nil, ErrNoCredentials
	}
	return a.verify(info.State.PeerCertificates)
}

// verify checks a presented chain (leaf first) and returns the caller it proves.
func (a *ClientCert) verify(certs []*x509.Certificate) (*Caller, error) {
	leaf := certs[0]
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         a.Roots(),
		Intermediates: inter,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return nil, fmt.Errorf("client certificate: %w", err)
	}
	if leaf.IsCA {
		return nil, fmt.Errorf("client certificate is a CA certificate")
	}
	if len(leaf.URIs) != 1 || len(leaf.DNSNames)+len(leaf.IPAddresses)+len(leaf.EmailAddresses) != 0 {
		return nil, fmt.Errorf("client certificate must carry exactly one URI SAN and no other SAN")
	}
	id, err := spiffeid.FromURI(leaf.URIs[0])
	if err != nil {
		return nil, fmt.Errorf("client certificate URI SAN: %w", err)
	}
	for _, op := range a.Operators {
		if id == op {
			return &Caller{Method: MethodOperator, Name: id.String(), Operator: true}, nil
		}
	}
	if id, err = CheckWorkloadID(a.TrustDomain, id); err != nil {
		return nil, fmt.Errorf("client certificate: %w", err)
	}
	return &Caller{Method: MethodMTLS, Identity: id, Name: id.String()}, nil
}
