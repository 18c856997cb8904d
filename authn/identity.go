package authn

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// ErrBadIdentity marks a SPIFFE ID that is not a workload identity of our trust domain.
var ErrBadIdentity = errors.New("not a workload identity")

// WorkloadID builds spiffe://<td>/ns/<ns>/sa/<sa>, refusing names that are not
// valid Kubernetes names so that no input can add path segments.
func WorkloadID(td spiffeid.TrustDomain, ns, sa string) (spiffeid.ID, error) {
	if !isDNSLabel(ns) {
		return spiffeid.ID{}, fmt.Errorf("%w: namespace %q is not a DNS-1123 label", ErrBadIdentity, ns)
	}
	if !isDNSSubdomain(sa) {
		return spiffeid.ID{}, fmt.Errorf("%w: service account %q is not a DNS-1123 subdomain", ErrBadIdentity, sa)
	}
	id, err := spiffeid.FromSegments(td, "ns", ns, "sa", sa)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: %w", ErrBadIdentity, err)
	}
	return id, nil
}

// ParseWorkloadID accepts exactly spiffe://<td>/ns/<ns>/sa/<sa> in trust domain td.
func ParseWorkloadID(td spiffeid.TrustDomain, s string) (spiffeid.ID, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("%w: %w", ErrBadIdentity, err)
	}
	return CheckWorkloadID(td, id)
}

// CheckWorkloadID checks that id is a workload identity of trust domain td.
func CheckWorkloadID(td spiffeid.TrustDomain, id spiffeid.ID) (spiffeid.ID, error) {
	if id.TrustDomain() != td {
		return spiffeid.ID{}, fmt.Errorf("%w: trust domain %q is not %q", ErrBadIdentity, id.TrustDomain().Name(), td.Name())
	}
	seg := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(seg) != 4 || seg[0] != "ns" || seg[2] != "sa" {
		return spiffeid.ID{}, fmt.Errorf("%w: path %q is not /ns/<namespace>/sa/<service-account>", ErrBadIdentity, id.Path())
	}
	return WorkloadID(td, seg[1], seg[3])
}

// isDNSLabel reports whether s is an RFC 1123 label: Kubernetes namespace names.
func isDNSLabel(s string) bool {
	if len(s) == 0 || len(s) > 63 {
		return false
	}
	for i := range len(s) {
		c := s[i]
		alnum := c >= 'a' && c <= 'z' || c >= '0' && c <= '9'
		if !alnum && (c != '-' || i == 0 || i == len(s)-1) {
			return false
		}
	}
	return true
}

// isDNSSubdomain reports whether s is an RFC 1123 subdomain: Kubernetes
// service-account names (labels joined by dots, 253 characters at most).
func isDNSSubdomain(s string) bool {
	if len(s) == 0 || len(s) > 253 {
		return false
	}
	for _, l := range strings.Split(s, ".") {
		if !isDNSLabel(l) {
			return false
		}
	}
	return true
}
