package authn

import (
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// serviceAccountSubPrefix starts the `sub` of Kubernetes service-account tokens:
// system:serviceaccount:<namespace>:<service-account>.
const serviceAccountSubPrefix = "system:serviceaccount:"

// identityRule maps a verified token's claims to a workload ID. The trust
// domain and the /ns/…/sa/… shape are fixed; claims only ever supply the two
// names, and WorkloadID refuses any name that is not a Kubernetes name, so no
// claim can add a path segment, a `..` or another trust domain.
type identityRule struct {
	// ns and sa are parsed templates; both nil selects the Kubernetes `sub` rule.
	ns, sa []templatePart
}

// templatePart is literal text or, when claim is set, the value of that claim.
type templatePart struct {
	literal string
	claim   string
}

// newIdentityRule parses the two templates of an OIDCIdentity; both empty
// means the default rule (sub = system:serviceaccount:<ns>:<sa>).
func newIdentityRule(c OIDCIdentity) (identityRule, error) {
	if c.Namespace == "" && c.ServiceAccount == "" {
		return identityRule{}, nil
	}
	var errs []error
	ns, err := parseTemplate(c.Namespace)
	if err != nil {
		errs = append(errs, fmt.Errorf("namespace: %w", err))
	}
	sa, err := parseTemplate(c.ServiceAccount)
	if err != nil {
		errs = append(errs, fmt.Errorf("serviceAccount: %w", err))
	}
	return identityRule{ns: ns, sa: sa}, errors.Join(errs...)
}

// parseTemplate splits a template such as "gh-{repository_owner_id}" into
// literal text and {claim} references. Literal text is limited to the
// characters of Kubernetes names, so a typo fails at start-up rather than on
// every request.
func parseTemplate(s string) ([]templatePart, error) {
	if s == "" {
		return nil, errors.New("required when the other identity template is set")
	}
	var parts []templatePart
	for s != "" {
		open := strings.IndexAny(s, "{}")
		if open < 0 {
			open = len(s)
		}
		if lit := s[:open]; lit != "" {
			for _, c := range lit {
				if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
					return nil, fmt.Errorf("literal %q may hold only a-z, 0-9, '-' and '.'", lit)
				}
			}
			parts = append(parts, templatePart{literal: lit})
		}
		s = s[open:]
		if s == "" {
			break
		}
		if s[0] == '}' {
			return nil, errors.New("'}' without '{'")
		}
		end := strings.IndexAny(s[1:], "{}")
		if end < 0 || s[1+end] != '}' {
			return nil, errors.New("'{' without a matching '}'")
		}
		name := s[1 : 1+end]
		if !isClaimName(name) {
			return nil, fmt.Errorf("claim name %q must be non-empty and hold only letters, digits, '_', '-', '.' or ':'", name)
		}
		parts = append(parts, templatePart{claim: name})
		s = s[2+end:]
	}
	return parts, nil
}

func isClaimName(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("_-.:", c)) {
			return false
		}
	}
	return true
}

// id returns the workload ID the claims prove in trust domain td.
func (r identityRule) id(td spiffeid.TrustDomain, claims map[string]json.RawMessage) (spiffeid.ID, error) {
	if r.ns == nil {
		sub, err := claimString(claims, "sub")
		if err != nil {
			return spiffeid.ID{}, err
		}
		rest, ok := strings.CutPrefix(sub, serviceAccountSubPrefix)
		names := strings.Split(rest, ":")
		if !ok || len(names) != 2 {
			return spiffeid.ID{}, fmt.Errorf("%w: sub is not %s<namespace>:<service-account>", ErrBadIdentity, serviceAccountSubPrefix)
		}
		return WorkloadID(td, names[0], names[1])
	}
	ns, err := expand(r.ns, claims)
	if err != nil {
		return spiffeid.ID{}, err
	}
	sa, err := expand(r.sa, claims)
	if err != nil {
		return spiffeid.ID{}, err
	}
	return WorkloadID(td, ns, sa)
}

// expand fills a template from the claims.
func expand(parts []templatePart, claims map[string]json.RawMessage) (string, error) {
	var b strings.Builder
	for _, p := range parts {
		if p.claim == "" {
			b.WriteString(p.literal)
			continue
		}
		v, err := claimString(claims, p.claim)
		if err != nil {
			return "", err
		}
		b.WriteString(v)
	}
	return b.String(), nil
}

// claimString reads a string or number claim (GitHub and GitLab send their
// numeric IDs as strings, other platforms as numbers) as text.
func claimString(claims map[string]json.RawMessage, name string) (string, error) {
	raw, ok := claims[name]
	if !ok || string(raw) == "null" {
		return "", fmt.Errorf("%w: claim %q is missing", ErrBadIdentity, name)
	}
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var n json.Number
	if err := json.Unmarshal(raw, &n); err == nil {
		return n.String(), nil
	}
	return "", fmt.Errorf("%w: claim %q is not a string or number", ErrBadIdentity, name)
}
