// Package certlint lints certificates with zlint's RFC 5280, RFC 5480 and
// RFC 8813 lints, for tests: every certificate Castellan makes passes them
// with no error and no warning, as Boulder and step-ca lint theirs. Tests
// link it, the binaries never do; a test that makes a new kind of
// certificate adds a call to Check.
package certlint

import (
	"crypto/x509"
	"fmt"
	"slices"
	"sync"
	"testing"

	zx509 "github.com/zmap/zcrypto/x509"
	"github.com/zmap/zlint/v3"
	"github.com/zmap/zlint/v3/lint"
)

// Sources are the lint sources every Castellan certificate must pass.
var Sources = lint.SourceList{lint.RFC5280, lint.RFC5480, lint.RFC8813}

// registry is zlint's global registry narrowed to Sources, built once.
var registry = sync.OnceValues(func() (lint.Registry, error) {
	return lint.GlobalRegistry().Filter(lint.FilterOptions{IncludeSources: Sources})
})

// Problems lints the DER certificate der with the lints of Sources and
// returns one line per lint that reports a warning, an error or a fatal
// problem, sorted: "<lint name>: <status> (<details>)". It also returns the
// number of lints that applied and passed, so that a caller can tell a
// clean certificate from one that no lint looked at.
func Problems(der []byte) (problems []string, passed int, err error) {
	reg, err := registry()
	if err != nil {
		return nil, 0, fmt.Errorf("zlint registry: %w", err)
	}
	c, err := zx509.ParseCertificate(der)
	if err != nil {
		return nil, 0, fmt.Errorf("zcrypto cannot parse the certificate: %w", err)
	}
	for name, r := range zlint.LintCertificateEx(c, reg).Results {
		switch {
		case r.Status >= lint.Warn:
			line := fmt.Sprintf("%s: %s", name, r.Status)
			if r.Details != "" {
				line += " (" + r.Details + ")"
			}
			problems = append(problems, line)
		case r.Status == lint.Pass:
			passed++
		}
	}
	slices.Sort(problems)
	return problems, passed, nil
}

// Check fails t unless cert passes every lint of Sources; what names the
// certificate in the failure.
func Check(t testing.TB, what string, cert *x509.Certificate) {
	t.Helper()
	problems, passed, err := Problems(cert.Raw)
	switch {
	case err != nil:
		t.Errorf("%s: %v", what, err)
	case len(problems) > 0:
		t.Errorf("%s (subject %q) fails %d zlint lints:", what, cert.Subject, len(problems))
		for _, p := range problems {
			t.Errorf("  %s", p)
		}
	case passed == 0:
		t.Errorf("%s: no zlint lint applied", what)
	}
}
