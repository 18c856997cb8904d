// Package authn proves who a CreateCertificate caller is: one Authenticator per
// credential type, tried in order by a Chain, each returning a Caller.
package authn

import (
	"context"
	"errors"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Authentication methods, recorded in the audit log.
const (
	MethodMTLS       = "mtls"
	MethodOperator   = "operator"
	MethodKubernetes = "kubernetes"
	MethodOIDC       = "oidc"
)

// Pod identifies the Kubernetes pod a token is bound to.
type Pod struct {
	Namespace string
	Name      string
	UID       string
	// NodeName is set when the apiserver put it in the token (Kubernetes ≥ 1.32).
	NodeName string
}

// Caller is an authenticated client.
type Caller struct {
	// Method is which authenticator accepted the caller (MethodMTLS, …).
	Method string
	// Identity is the workload SPIFFE ID the caller proved; zero for operators.
	Identity spiffeid.ID
	// Name is how the caller is shown in the audit log (its ID or credential subject).
	Name string
	// Operator is true for operator credentials, which may issue any workload identity.
	Operator bool
	// ClusterID is the cluster whose credentials proved the caller (Kubernetes tokens).
	ClusterID string
	// Pod is the pod a Kubernetes token is bound to; nil for unbound tokens and other methods.
	Pod *Pod
}

var (
	// ErrNoCredentials means the authenticator found no credential of its kind;
	// a Chain then tries the next one.
	ErrNoCredentials = errors.New("no credentials")
	// ErrUnavailable means the credential could not be checked right now (e.g. the
	// token API is down); the caller should retry.
	ErrUnavailable = errors.New("authentication backend unavailable")
)

// Authenticator proves a caller's identity from the request context (gRPC peer
// and metadata). It returns ErrNoCredentials when its credential type is absent.
type Authenticator interface {
	Authenticate(ctx context.Context) (*Caller, error)
}

// Chain tries each authenticator in order; the first that finds its credential
// decides, so a presented-but-invalid credential is refused rather than skipped.
type Chain []Authenticator

// Authenticate runs the chain.
func (c Chain) Authenticate(ctx context.Context) (*Caller, error) {
	for _, a := range c {
		caller, err := a.Authenticate(ctx)
		if errors.Is(err, ErrNoCredentials) {
			continue
		}
		if err != nil {
			if m, ok := a.(interface{ Method() string }); ok {
				err = &Failure{Method: m.Method(), Err: err}
			}
			return nil, err
		}
		return caller, nil
	}
	return nil, fmt.Errorf("authenticate: %w", ErrNoCredentials)
}

// Failure is a refusal by the authenticator that found its credential,
// naming the method so that refusals are audited with it too.
type Failure struct {
	Method string
	Err    error
}

// Error is the method and the cause.
func (f *Failure) Error() string { return f.Method + ": " + f.Err.Error() }

// Unwrap exposes the cause (e.g. ErrUnavailable) to errors.Is.
func (f *Failure) Unwrap() error { return f.Err }
