package local

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/asn1"
	"fmt"
	"io"
	"time"

	"golang.org/x/crypto/cryptobyte"
	cbasn1 "golang.org/x/crypto/cryptobyte/asn1"
)

// The leaf encoder produces, for the leaf profiles Castellan issues, exactly
// the DER that x509.CreateCertificate produces, byte for byte (leaf_test.go
// proves it against CreateCertificate for every key type, and
// FuzzLeafEncoding over the inputs), and signs it once. CreateCertificate
// costs two things on the hot path that this does not:
//   - it verifies the signature it has just made, so that a faulty
//     crypto.Signer (an HSM, a KMS) never yields a certificate that relying
//     parties reject. The encoder only signs with the standard library's
//     in-memory keys, whose signatures are correct by construction (crypto/rsa
//     also checks its own CRT result against fault attacks) and whose match
//     with the issuing CA New has checked; every other key goes through
//     CreateCertificate and keeps that check.
//   - it marshals the TBSCertificate with encoding/asn1, by reflection.
// A template using anything outside the profile (a subject, CA flags,
// policies, name constraints, extra extensions, an explicit signature
// algorithm...) also goes through CreateCertificate, which stays the reference.

// DER OIDs (contents only) of what the profile uses.
var (
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
	oidExtKeyUsage      = asn1.ObjectIdentifier{2, 5, 29, 37}
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidSubjectKeyID     = asn1.ObjectIdentifier{2, 5, 29, 14}
	oidAuthorityKeyID   = asn1.ObjectIdentifier{2, 5, 29, 35}
	oidSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}

	oidECDSAWithSHA256 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 2}
	oidECDSAWithSHA384 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 3}
	oidECDSAWithSHA512 = asn1.ObjectIdentifier{1, 2, 840, 10045, 4, 3, 4}
	oidSHA256WithRSA   = asn1.ObjectIdentifier{1, 2, 840, 113549, 1, 1, 11}
	oidEd25519         = asn1.ObjectIdentifier{1, 3, 101, 112}

	// Extended key usages the fast path encodes; any other goes through
	// CreateCertificate.
	extKeyUsageOIDs = map[x509.ExtKeyUsage]asn1.ObjectIdentifier{
		x509.ExtKeyUsageServerAuth: {1, 3, 6, 1, 5, 5, 7, 3, 1},
		x509.ExtKeyUsageClientAuth: {1, 3, 6, 1, 5, 5, 7, 3, 2},
	}

	// SubjectPublicKeyInfo prefixes of the uncompressed EC points: SEQUENCE {
	// SEQUENCE { id-ecPublicKey, namedCurve }, BIT STRING (0 unused bits) }.
	spkiPrefixP256 = []byte{0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
		0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00}
	spkiPrefixP384 = []byte{0x30, 0x76, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
		0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22, 0x03, 0x62, 0x00}
)

// emptySubject is the DER of an empty Name, the subject of every leaf the
// encoder produces.
var emptySubject = []byte{0x30, 0x00}

// sigParams is how the CA key signs: the hash (0 for Ed25519) and the DER
// AlgorithmIdentifier, as x509's defaults for the key type.
type sigParams struct {
	hash  crypto.Hash
	algID []byte
}

// fastSigParams returns the signature parameters for an in-memory standard
// library key, and false for any other key (an HSM or KMS handle, a P-224
// key, which CreateCertificate handles and checks).
func fastSigParams(key crypto.Signer) (sigParams, bool) {
	var oid asn1.ObjectIdentifier
	var h crypto.Hash
	rsaNull := false
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		switch k.Curve {
		case elliptic.P256():
			oid, h = oidECDSAWithSHA256, crypto.SHA256
		case elliptic.P384():
			oid, h = oidECDSAWithSHA384, crypto.SHA384
		case elliptic.P521():
			oid, h = oidECDSAWithSHA512, crypto.SHA512
		default:
			return sigParams{}, false
		}
	case *rsa.PrivateKey:
		oid, h, rsaNull = oidSHA256WithRSA, crypto.SHA256, true
	case ed25519.PrivateKey:
		oid = oidEd25519
	default:
		return sigParams{}, false
	}
	var b cryptobyte.Builder
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1ObjectIdentifier(oid)
		if rsaNull {
			b.AddASN1NULL()
		}
	})
	return sigParams{hash: h, algID: b.BytesOrPanic()}, true
}

// inProfile reports whether CreateCertificate would read nothing of tmpl
// beyond what encodeTBS encodes: every field its documentation lists is
// either encoded here or zero.
func inProfile(tmpl *x509.Certificate) bool {
	switch {
	case tmpl.SerialNumber == nil || tmpl.SerialNumber.Sign() < 0,
		tmpl.SignatureAlgorithm != x509.UnknownSignatureAlgorithm,
		len(tmpl.RawSubject) != 0 || !emptyName(&tmpl.Subject),
		tmpl.IsCA || tmpl.MaxPathLenZero || (tmpl.MaxPathLen != 0 && tmpl.MaxPathLen != -1),
		len(tmpl.UnknownExtKeyUsage) != 0,
		len(tmpl.ExtraExtensions) != 0,
		len(tmpl.OCSPServer) != 0 || len(tmpl.IssuingCertificateURL) != 0,
		len(tmpl.CRLDistributionPoints) != 0,
		len(tmpl.PolicyIdentifiers) != 0 || len(tmpl.Policies) != 0,
		tmpl.PermittedDNSDomainsCritical,
		len(tmpl.PermittedDNSDomains) != 0 || len(tmpl.ExcludedDNSDomains) != 0,
		len(tmpl.PermittedIPRanges) != 0 || len(tmpl.ExcludedIPRanges) != 0,
		len(tmpl.PermittedEmailAddresses) != 0 || len(tmpl.ExcludedEmailAddresses) != 0,
		len(tmpl.PermittedURIDomains) != 0 || len(tmpl.ExcludedURIDomains) != 0:
		return false
	}
	for _, u := range tmpl.ExtKeyUsage {
		if _, ok := extKeyUsageOIDs[u]; !ok {
			return false
		}
	}
	return true
}

// emptyName reports whether n encodes as an empty Name (x509 encodes
// n.ToRDNSequence(), which ignores n.Names).
func emptyName(n *pkix.Name) bool {
	return len(n.Country) == 0 && len(n.Organization) == 0 && len(n.OrganizationalUnit) == 0 &&
		len(n.Locality) == 0 && len(n.Province) == 0 && len(n.StreetAddress) == 0 && len(n.PostalCode) == 0 &&
		n.SerialNumber == "" && n.CommonName == "" && len(n.ExtraNames) == 0
}

// encodeTBS returns the DER TBSCertificate CreateCertificate builds for
// (tmpl, parent, pub) signed with sp, or ok false when tmpl, parent or pub is
// outside what the encoder handles (CreateCertificate then decides, errors included).
func encodeTBS(tmpl, parent *x509.Certificate, pub crypto.PublicKey, sp sigParams) (tbs []byte, ok bool) {
	if !inProfile(tmpl) || len(parent.RawSubject) == 0 {
		return nil, false
	}
	spki, ok := marshalSPKI(pub)
	if !ok {
		return nil, false
	}
	sans, ok := marshalSANs(tmpl)
	if !ok {
		return nil, false
	}
	// As CreateCertificate: the issuer's key id, unless the issuer's name is
	// the leaf's (then whatever the template says).
	akid := tmpl.AuthorityKeyId
	if !bytes.Equal(parent.RawSubject, emptySubject) && len(parent.SubjectKeyId) > 0 {
		akid = parent.SubjectKeyId
	}

	eb := cryptobyte.NewBuilder(make([]byte, 0, 160+len(sans)))
	addExtensions(eb, tmpl, akid, sans)
	exts, err := eb.Bytes()
	if err != nil {
		return nil, false
	}

	b := cryptobyte.NewBuilder(make([]byte, 0, 256+len(spki)+len(exts)))
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1(cbasn1.Tag(0).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
			b.AddASN1Int64(2) // v3
		})
		b.AddASN1BigInt(tmpl.SerialNumber)
		b.AddBytes(sp.algID)
		b.AddBytes(parent.RawSubject)
		b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
			addTime(b, tmpl.NotBefore)
			addTime(b, tmpl.NotAfter)
		})
		b.AddBytes(emptySubject)
		b.AddBytes(spki)
		// As CreateCertificate, no [3] at all when there is no extension (a
		// nameless issuer and a template asking for nothing).
		if len(exts) > 0 {
			b.AddASN1(cbasn1.Tag(3).Constructed().ContextSpecific(), func(b *cryptobyte.Builder) {
				b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) { b.AddBytes(exts) })
			})
		}
	})
	tbs, err = b.Bytes()
	if err != nil {
		return nil, false // a time outside ASN.1's range: CreateCertificate reports it
	}
	return tbs, true
}

// addExtensions adds the extensions in CreateCertificate's order: key usage,
// extended key usage, basic constraints, subject and authority key ids, SAN
// (critical: the subject is empty).
func addExtensions(b *cryptobyte.Builder, tmpl *x509.Certificate, akid, sans []byte) {
	if ku := tmpl.KeyUsage; ku != 0 {
		a := [2]byte{reverseBits(byte(ku & 0xff)), reverseBits(byte(ku >> 8 & 0xff))} // the low 16 bits, as x509
		bits := a[:1]
		if a[1] != 0 {
			bits = a[:2]
		}
		addExtension(b, oidKeyUsage, true, func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.BIT_STRING, func(b *cryptobyte.Builder) {
				b.AddUint8(uint8((8 - bitLength(bits)%8) % 8)) // as encoding/asn1
				b.AddBytes(bits)
			})
		})
	}
	if len(tmpl.ExtKeyUsage) > 0 {
		addExtension(b, oidExtKeyUsage, false, func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
				for _, u := range tmpl.ExtKeyUsage {
					b.AddASN1ObjectIdentifier(extKeyUsageOIDs[u])
				}
			})
		})
	}
	if tmpl.BasicConstraintsValid {
		// CA:false is the DEFAULT and no path length: an empty SEQUENCE.
		addExtension(b, oidBasicConstraints, true, func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(*cryptobyte.Builder) {})
		})
	}
	if len(tmpl.SubjectKeyId) > 0 {
		addExtension(b, oidSubjectKeyID, false, func(b *cryptobyte.Builder) {
			b.AddASN1OctetString(tmpl.SubjectKeyId)
		})
	}
	if len(akid) > 0 {
		addExtension(b, oidAuthorityKeyID, false, func(b *cryptobyte.Builder) {
			b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
				b.AddASN1(cbasn1.Tag(0).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes(akid) })
			})
		})
	}
	if sans != nil {
		addExtension(b, oidSubjectAltName, true, func(b *cryptobyte.Builder) { b.AddBytes(sans) })
	}
}

// addExtension adds an Extension; critical is encoded only when true (DEFAULT FALSE).
func addExtension(b *cryptobyte.Builder, oid asn1.ObjectIdentifier, critical bool, value cryptobyte.BuilderContinuation) {
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddASN1ObjectIdentifier(oid)
		if critical {
			b.AddASN1Boolean(true)
		}
		b.AddASN1(cbasn1.OCTET_STRING, value)
	})
}

// marshalSANs returns the GeneralNames DER of tmpl's names in
// CreateCertificate's order (DNS, email, IP, URI), nil when there are none,
// and false for a name that is not IA5 (CreateCertificate reports it).
func marshalSANs(tmpl *x509.Certificate) ([]byte, bool) {
	if len(tmpl.DNSNames)+len(tmpl.EmailAddresses)+len(tmpl.IPAddresses)+len(tmpl.URIs) == 0 {
		return nil, true
	}
	var b cryptobyte.Builder
	ok := true
	addName := func(b *cryptobyte.Builder, tag uint8, v string) {
		for i := range len(v) {
			if v[i] >= 0x80 { // IA5String is ASCII (any byte ≥ 0x80 is a rune above it, or invalid)
				ok = false
			}
		}
		b.AddASN1(cbasn1.Tag(tag).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes([]byte(v)) })
	}
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		for _, n := range tmpl.DNSNames {
			addName(b, 2, n)
		}
		for _, e := range tmpl.EmailAddresses {
			addName(b, 1, e)
		}
		for _, ip := range tmpl.IPAddresses {
			if ip4 := ip.To4(); ip4 != nil {
				ip = ip4
			}
			b.AddASN1(cbasn1.Tag(7).ContextSpecific(), func(b *cryptobyte.Builder) { b.AddBytes(ip) })
		}
		for _, u := range tmpl.URIs {
			addName(b, 6, u.String())
		}
	})
	der, err := b.Bytes()
	if err != nil || !ok {
		return nil, false
	}
	return der, true
}

// marshalSPKI is x509.MarshalPKIXPublicKey, with the common ECDSA keys
// encoded without reflection.
func marshalSPKI(pub crypto.PublicKey) ([]byte, bool) {
	if k, ok := pub.(*ecdsa.PublicKey); ok {
		var prefix []byte
		switch k.Curve {
		case elliptic.P256():
			prefix = spkiPrefixP256
		case elliptic.P384():
			prefix = spkiPrefixP384
		}
		if prefix != nil {
			point, err := k.Bytes()
			if err != nil {
				return nil, false
			}
			return append(append(make([]byte, 0, len(prefix)+len(point)), prefix...), point...), true
		}
	}
	der, err := x509.MarshalPKIXPublicKey(pub)
	return der, err == nil
}

// addTime adds t as x509 does: UTC, whole seconds, UTCTime for 1950-2049
// and GeneralizedTime otherwise.
func addTime(b *cryptobyte.Builder, t time.Time) {
	t = t.UTC()
	if y := t.Year(); y >= 1950 && y < 2050 {
		b.AddASN1UTCTime(t)
		return
	}
	b.AddASN1GeneralizedTime(t)
}

func reverseBits(in byte) byte {
	b1 := in>>4 | in<<4
	b2 := b1>>2&0x33 | b1<<2&0xcc
	return b2>>1&0x55 | b2<<1&0xaa
}

// bitLength is the length of a BIT STRING without its trailing zero bits.
func bitLength(bits []byte) int {
	n := len(bits) * 8
	for i := len(bits) - 1; i >= 0; i-- {
		for bit := range uint(8) {
			if bits[i]>>bit&1 == 1 {
				return n
			}
			n--
		}
	}
	return 0
}

// signTBS signs tbs once and wraps it into a Certificate.
func signTBS(rand io.Reader, key crypto.Signer, sp sigParams, tbs []byte) ([]byte, error) {
	sig, err := crypto.SignMessage(key, rand, tbs, sp.hash)
	if err != nil {
		return nil, fmt.Errorf("sign: %w", err)
	}
	b := cryptobyte.NewBuilder(make([]byte, 0, len(tbs)+len(sp.algID)+len(sig)+16))
	b.AddASN1(cbasn1.SEQUENCE, func(b *cryptobyte.Builder) {
		b.AddBytes(tbs)
		b.AddBytes(sp.algID)
		b.AddASN1(cbasn1.BIT_STRING, func(b *cryptobyte.Builder) {
			b.AddUint8(0)
			b.AddBytes(sig)
		})
	})
	return b.Bytes()
}

// createLeaf is x509.CreateCertificate for the leaf profile with an
// in-memory key, signing once; anything else goes to CreateCertificate.
// sp is fastSigParams(key), computed once per Signer.
func createLeaf(rand io.Reader, tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer, sp sigParams, fast bool) ([]byte, error) {
	if fast {
		if tbs, ok := encodeTBS(tmpl, parent, pub, sp); ok {
			return signTBS(rand, key, sp, tbs)
		}
	}
	return x509.CreateCertificate(rand, tmpl, parent, pub, key)
}
