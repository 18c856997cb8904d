package ca_test

import (
	"crypto/x509/pkix"
	"encoding/asn1"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer/signertest"
)

// reencode returns csrPEM with its DER changed by mutate.
func reencode(t testing.TB, csrPEM string, mutate func([]byte) []byte) string {
	t.Helper()
	block, _ := pem.Decode([]byte(csrPEM))
	if block == nil {
		t.Fatal("not PEM")
	}
	der := mutate(append([]byte(nil), block.Bytes...))
	return string(pem.EncodeToMemory(&pem.Block{Type: block.Type, Bytes: der}))
}

func flipLastByte(der []byte) []byte { der[len(der)-1] ^= 0x01; return der }

// csrCases are the ParseCSR table, also the fuzz seeds. reason "" means accepted.
func csrCases(t testing.TB) []struct {
	name, csr, reason string
	keyErr            bool
} {
	t.Helper()
	p256 := signertest.Key(0)
	rsa2048 := leafKey("rsa-2048")
	id := appID.String()
	good := ztunnelCSR(t, p256, appID)
	pilot := pilotAgentCSR(t, rsa2048, appID)
	asCert := string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{0x30, 0x00}}))
	newType := strings.ReplaceAll(good, "CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST")
	atLimit := good + strings.Repeat("\n", ca.MaxCSRBytes-len(good))
	return []struct {
		name, csr, reason string
		keyErr            bool
	}{
		{name: "pilot-agent RSA-2048 O= critical URI SAN", csr: pilot},
		{name: "pilot-agent ECDSA P-256", csr: pilotAgentCSR(t, p256, appID)},
		{name: "pilot-agent ECDSA P-384", csr: pilotAgentCSR(t, leafKey("ecdsa-p384"), appID)},
		{name: "ztunnel P-256 empty subject URI SAN", csr: good},
		{name: "ed25519", csr: ztunnelCSR(t, leafKey("ed25519"), appID)},
		{name: "no SAN at all", csr: makeCSR(t, csrSpec{key: p256})},
		{name: "subject ignored", csr: makeCSR(t, csrSpec{key: p256, subject: pkix.Name{CommonName: "admin", Organization: []string{"system:masters"}}, uris: []string{id}})},
		{name: "NEW CERTIFICATE REQUEST block type", csr: newType},
		{name: "trailing whitespace", csr: good + "\n\n  \t\n"},
		{name: "exactly at the size limit", csr: atLimit},

		{name: "empty", csr: "", reason: "csr.not_pem"},
		{name: "not PEM", csr: "MIIBhello", reason: "csr.not_pem"},
		{name: "raw DER", csr: string(makeCSRDER(t, csrSpec{key: p256})), reason: "csr.not_pem"},
		{name: "PEM of another type", csr: asCert, reason: "csr.not_pem"},
		{name: "two PEM blocks", csr: good + good, reason: "csr.multiple_blocks"},
		{name: "CSR then certificate", csr: good + asCert, reason: "csr.multiple_blocks"},
		{name: "trailing garbage", csr: good + "garbage", reason: "csr.multiple_blocks"},
		{name: "corrupted DER", csr: reencode(t, good, func(b []byte) []byte { b[1] ^= 0xff; return b }), reason: "csr.parse"},
		{name: "truncated DER", csr: reencode(t, good, func(b []byte) []byte { return b[:len(b)/2] }), reason: "csr.parse"},
		{name: "empty DER", csr: reencode(t, good, func([]byte) []byte { return nil }), reason: "csr.parse"},
		{name: "bad ECDSA signature", csr: reencode(t, good, flipLastByte), reason: "csr.signature"},
		{name: "bad RSA signature", csr: reencode(t, pilot, flipLastByte), reason: "csr.signature"},
		{name: "RSA-1024", csr: pilotAgentCSR(t, moreKeys().rsa1024, appID), reason: "csr.key", keyErr: true},
		{name: "P-224", csr: ztunnelCSR(t, moreKeys().p224, appID), reason: "csr.key", keyErr: true},
		{name: "P-521", csr: ztunnelCSR(t, moreKeys().p521, appID), reason: "csr.key", keyErr: true},
		{name: "other URI SAN", csr: ztunnelCSR(t, p256, otherID), reason: "csr.san_mismatch"},
		{name: "other URI SAN critical", csr: pilotAgentCSR(t, p256, otherID), reason: "csr.san_mismatch"},
		{name: "same path in another trust domain", csr: ztunnelCSR(t, p256, foreignID), reason: "csr.san_mismatch"},
		{name: "granted URI with trailing slash", csr: makeCSR(t, csrSpec{key: p256, uris: []string{id + "/"}}), reason: "csr.san_mismatch"},
		{name: "granted URI with different case", csr: makeCSR(t, csrSpec{key: p256, uris: []string{strings.ToUpper(id)}}), reason: "csr.san_mismatch"},
		{name: "two URI SANs both granted", csr: makeCSR(t, csrSpec{key: p256, uris: []string{id, id}}), reason: "csr.san_mismatch"},
		{name: "two URI SANs", csr: makeCSR(t, csrSpec{key: p256, uris: []string{id, otherID.String()}}), reason: "csr.san_mismatch"},
		{name: "DNS SAN", csr: makeCSR(t, csrSpec{key: p256, dns: []string{"app.default.svc"}}), reason: "csr.forbidden_san"},
		{name: "DNS SAN beside the granted URI", csr: makeCSR(t, csrSpec{key: p256, uris: []string{id}, dns: []string{"app.default.svc"}, criticalSAN: true}), reason: "csr.forbidden_san"},
		{name: "IP SAN", csr: makeCSR(t, csrSpec{key: p256, ips: []net.IP{net.IPv4(10, 0, 0, 1)}}), reason: "csr.forbidden_san"},
		{name: "email SAN", csr: makeCSR(t, csrSpec{key: p256, emails: []string{"root@example.com"}}), reason: "csr.forbidden_san"},
		{name: "too large", csr: atLimit + "\n", reason: "csr.too_large"},
		{name: "huge", csr: strings.Repeat("A", 1<<20), reason: "csr.too_large"},
	}
}

func TestParseCSR(t *testing.T) {
	for _, tc := range csrCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			csr, err := ca.ParseCSR(tc.csr, appID)
			if tc.reason == "" {
				if err != nil {
					t.Fatalf("ParseCSR: %v (reason %q), want accepted", err, ca.ReasonOf(err))
				}
				if csr == nil || csr.PublicKey == nil {
					t.Fatal("ParseCSR returned no CSR")
				}
				if len(csr.URIs) > 1 || (len(csr.URIs) == 1 && csr.URIs[0].String() != appID.String()) {
					t.Errorf("accepted CSR asks for URIs %v", csr.URIs)
				}
				return
			}
			if csr != nil {
				t.Errorf("ParseCSR returned a CSR with error %v", err)
			}
			if !errors.Is(err, ca.ErrInvalidRequest) {
				t.Fatalf("error = %v, want ErrInvalidRequest", err)
			}
			if got := ca.ReasonOf(err); got != tc.reason {
				t.Errorf("reason = %q, want %q (error %v)", got, tc.reason, err)
			}
			if tc.keyErr != errors.Is(err, ca.ErrKeyType) {
				t.Errorf("errors.Is(err, ErrKeyType) = %v, want %v", !tc.keyErr, tc.keyErr)
			}
			st := ca.Status(err)
			if st.Code() != codes.InvalidArgument || !strings.HasPrefix(st.Message(), "CSR signing error (") {
				t.Errorf("status = %s %q, want InvalidArgument \"CSR signing error (...)\"", st.Code(), st.Message())
			}
		})
	}
}

// TestParseCSRPilotAgentShape pins that the pilot-agent-style test CSR really
// has what pilot-agent sends (critical SAN, O= subject), so the table above tests it.
func TestParseCSRPilotAgentShape(t *testing.T) {
	csr, err := ca.ParseCSR(pilotAgentCSR(t, leafKey("rsa-2048"), appID), appID)
	if err != nil {
		t.Fatal(err)
	}
	critical := false
	for _, e := range csr.Extensions {
		if e.Id.Equal(oidSAN) {
			critical = e.Critical
		}
	}
	if !critical {
		t.Error("pilot-agent CSR's SAN is not critical")
	}
	if o := csr.Subject.Organization; len(o) != 1 || o[0] != "" {
		t.Errorf("subject O = %q, want one empty organization", o)
	}
}

func FuzzParseCSR(f *testing.F) {
	for _, tc := range csrCases(f) {
		if len(tc.csr) <= ca.MaxCSRBytes+1 {
			f.Add(tc.csr)
		}
	}
	key := signertest.Key(7)
	for _, elem := range hostileNames(f) {
		f.Add(csrWithExtensions(f, key, sanExtension(true, grantedURI(), elem)))
	}
	f.Fuzz(func(t *testing.T, s string) {
		csr, err := ca.ParseCSR(s, appID)
		if err != nil {
			if csr != nil {
				t.Fatalf("CSR returned with error %v", err)
			}
			if !errors.Is(err, ca.ErrInvalidRequest) || ca.Status(err).Code() != codes.InvalidArgument {
				t.Fatalf("error %v is not an InvalidArgument refusal", err)
			}
			if r := ca.ReasonOf(err); !strings.HasPrefix(r, "csr.") {
				t.Fatalf("reason %q is not a csr.* reason", r)
			}
			return
		}
		if err := csr.CheckSignature(); err != nil {
			t.Fatalf("accepted CSR's signature does not verify: %v", err)
		}
		if err := ca.CheckPublicKey(csr.PublicKey); err != nil {
			t.Fatalf("accepted CSR's key is refused: %v", err)
		}
		if uri, present, err := onlyURISAN(csr.Extensions); present && (err != nil || uri != appID.String()) {
			t.Fatalf("accepted CSR's SAN is not exactly the granted URI: %q, %v", uri, err)
		}
	})
}

// onlyURISAN reads the subjectAltName of exts with encoding/asn1, an
// oracle independent of the code under test: the one URI it holds, or an
// error unless it holds exactly one name, a primitive [6], in one extension.
func onlyURISAN(exts []pkix.Extension) (uri string, present bool, err error) {
	for _, e := range exts {
		if !e.Id.Equal(oidSAN) {
			continue
		}
		if present {
			return "", true, errors.New("two SAN extensions")
		}
		present = true
		var names []asn1.RawValue
		if rest, err := asn1.Unmarshal(e.Value, &names); err != nil || len(rest) != 0 {
			return "", true, fmt.Errorf("SAN does not parse: %w", err)
		}
		if len(names) != 1 || names[0].Class != asn1.ClassContextSpecific || names[0].Tag != 6 || names[0].IsCompound {
			return "", true, fmt.Errorf("SAN holds %d names, not exactly one URI: %x", len(names), e.Value)
		}
		uri = string(names[0].Bytes)
	}
	return uri, present, nil
}
