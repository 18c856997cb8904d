package ca

import (
	"bytes"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"errors"
	"fmt"
	"net"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// The subjectAltName checks read the extension's raw DER, not crypto/x509's
// parsed fields: x509 keeps only DNS, email, IP and URI names and skips every
// other GeneralName choice (otherName, x400Address, directoryName,
// ediPartyName, registeredID), which a backend that copies a CSR's
// extensions would put into the leaf, and which another relying party may
// well honour. So every name counts here, whatever its choice or encoding.

var (
	oidSubjectAltName = asn1.ObjectIdentifier{2, 5, 29, 17}
	// extensionRequestDER is the content of the OID 1.2.840.113549.1.9.14
	// (PKCS #9 extensionRequest), compared without decoding.
	extensionRequestDER = []byte{0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x0e}
)

// GeneralName choices as DER tags (RFC 5280 4.2.1.6): context-specific,
// primitive for the string and address choices.
var (
	tagEmail = cbasn1.Tag(1).ContextSpecific()
	tagDNS   = cbasn1.Tag(2).ContextSpecific()
	tagURI   = cbasn1.Tag(6).ContextSpecific()
	tagIP    = cbasn1.Tag(7).ContextSpecific()
)

// generalNameTypes names the GeneralName choices by tag number, for messages.
var generalNameTypes = [...]string{"otherName", "rfc822Name (email)", "dNSName", "x400Address", "directoryName",
	"ediPartyName", "uniformResourceIdentifier", "iPAddress", "registeredID"}

// generalName is one name of a subjectAltName extension: its DER tag (the
// GeneralName choice, constructed bit included) and content octets.
type generalName struct {
	tag   cbasn1.Tag
	value []byte
}

// String names the choice; a name with an unexpected encoding says so.
func (n generalName) String() string {
	num := int(n.tag & 0x1f)
	switch {
	case n.tag&0xc0 != 0x80 || num >= len(generalNameTypes):
		return fmt.Sprintf("element with tag 0x%02x (not a GeneralName)", uint8(n.tag))
	case n.tag == tagURI:
		return fmt.Sprintf("URI %q", n.value)
	case n.tag == tagDNS:
		return fmt.Sprintf("dNSName %q", n.value)
	}
	return generalNameTypes[num]
}

// errSAN marks a subjectAltName extension that cannot be read: two of them,
// trailing data, an empty list or a malformed element.
var errSAN = errors.New("malformed subjectAltName")

// subjectAltNames returns the names of the one subjectAltName extension of
// exts, parsed from its raw value; present is false when exts has none.
func subjectAltNames(exts []pkix.Extension) (names []generalName, present bool, err error) {
	var raw []byte
	for _, e := range exts {
		if e.Id.Equal(oidSubjectAltName) {
			if present {
				return nil, true, fmt.Errorf("%w: the extension appears twice", errSAN)
			}
			present, raw = true, e.Value
		}
	}
	if !present {
		return nil, false, nil
	}
	in := cryptobyte.String(raw)
	var seq cryptobyte.String
	if !in.ReadASN1(&seq, cbasn1.SEQUENCE) || !in.Empty() {
		return nil, true, fmt.Errorf("%w: not one SEQUENCE", errSAN)
	}
	for !seq.Empty() {
		var n generalName
		if !seq.ReadAnyASN1((*cryptobyte.String)(&n.value), &n.tag) {
			return nil, true, fmt.Errorf("%w: element %d does not parse", errSAN, len(names)+1)
		}
		names = append(names, n)
	}
	if len(names) == 0 {
		return nil, true, fmt.Errorf("%w: no names", errSAN)
	}
	return names, true, nil
}

// onlyGrantedURI checks names against the one name a workload certificate
// carries: the granted URI, in a primitive [6] IA5String. It returns the
// refusal reason and why.
func onlyGrantedURI(names []generalName, grant string) (reason string, err error) {
	for _, n := range names {
		if n.tag != tagURI {
			return ReasonCSRForbiddenSAN, fmt.Errorf("CSR asks for a %s SAN; workload certificates carry only the granted URI", n)
		}
	}
	switch {
	case len(names) != 1:
		return ReasonCSRSANMismatch, fmt.Errorf("CSR asks for %d URI SANs, only the granted identity is allowed", len(names))
	case string(names[0].value) != grant:
		return ReasonCSRSANMismatch, fmt.Errorf("CSR asks for URI SAN %q, caller is granted %q", names[0].value, grant)
	}
	return "", nil
}

// checkCSRAttributes refuses a CSR whose attributes could carry extensions
// that crypto/x509 does not report: anything but a single extensionRequest
// attribute with a single value (x509 reads the first value of each and
// ignores other attributes, such as Microsoft's certificate extensions
// attribute, which other CAs honour). Istio's agents send exactly that, or
// no attribute at all.
func checkCSRAttributes(csr *x509.CertificateRequest) error {
	in := cryptobyte.String(csr.RawTBSCertificateRequest)
	var tbs, attrs cryptobyte.String
	var hasAttrs bool
	if !in.ReadASN1(&tbs, cbasn1.SEQUENCE) || !tbs.SkipASN1(cbasn1.INTEGER) || !tbs.SkipASN1(cbasn1.SEQUENCE) ||
		!tbs.SkipASN1(cbasn1.SEQUENCE) || !tbs.ReadOptionalASN1(&attrs, &hasAttrs, cbasn1.Tag(0).ContextSpecific().Constructed()) {
		return errors.New("CSR attributes do not parse")
	}
	seen := false
	for !attrs.Empty() {
		var attr, oid, values cryptobyte.String
		if !attrs.ReadASN1(&attr, cbasn1.SEQUENCE) || !attr.ReadASN1(&oid, cbasn1.OBJECT_IDENTIFIER) || !attr.ReadASN1(&values, cbasn1.SET) || !attr.Empty() {
			return errors.New("CSR attribute does not parse")
		}
		if !bytes.Equal(oid, extensionRequestDER) {
			return fmt.Errorf("CSR carries attribute %x (DER); only the extension request is accepted", []byte(oid))
		}
		if seen || !values.SkipASN1(cbasn1.SEQUENCE) || !values.Empty() {
			return errors.New("CSR carries more than one extension request")
		}
		seen = true
	}
	return nil
}

// sameNames checks that a certificate's SAN names are exactly those of
// tmpl (DNS, email, IP and URI names, in any order) and nothing else.
func sameNames(names []generalName, tmpl *x509.Certificate) error {
	// A workload leaf: one URI, compared without building the list.
	if len(names) == 1 && len(tmpl.URIs) == 1 && len(tmpl.DNSNames)+len(tmpl.EmailAddresses)+len(tmpl.IPAddresses) == 0 &&
		names[0].tag == tagURI && string(names[0].value) == tmpl.URIs[0].String() {
		return nil
	}
	want := make([]generalName, 0, len(tmpl.DNSNames)+len(tmpl.EmailAddresses)+len(tmpl.IPAddresses)+len(tmpl.URIs))
	for _, d := range tmpl.DNSNames {
		want = append(want, generalName{tagDNS, []byte(d)})
	}
	for _, e := range tmpl.EmailAddresses {
		want = append(want, generalName{tagEmail, []byte(e)})
	}
	for _, ip := range tmpl.IPAddresses {
		want = append(want, generalName{tagIP, ip})
	}
	for _, u := range tmpl.URIs {
		want = append(want, generalName{tagURI, []byte(u.String())})
	}
	if len(names) != len(want) {
		return fmt.Errorf("leaf has %d SANs, want %d", len(names), len(want))
	}
next:
	for _, n := range names {
		for i, w := range want {
			if w.tag == n.tag && (bytes.Equal(w.value, n.value) || (n.tag == tagIP && net.IP(w.value).Equal(n.value))) {
				want = append(want[:i], want[i+1:]...)
				continue next
			}
		}
		return fmt.Errorf("leaf carries a %s SAN that was not granted", n)
	}
	return nil
}
