package rotation

import (
	"crypto"
	"unicode/utf8"
)

// providerKey is a CA key held by the Generator's key provider (an HSM or a
// KMS): the state stores where it is, never the key.
type providerKey interface {
	crypto.Signer
	URI() string
}

// keyRef returns the stored form of a key held by a key provider: its URI
// behind the format byte formatKeyURI, in place of a sealed key.
func keyRef(uri string) []byte { return append([]byte{formatKeyURI}, uri...) }

// refURI returns the URI of a stored key reference; ok is false for
// anything else (a sealed key, none).
func refURI(blob []byte) (uri string, ok bool) {
	if !isKeyRef(blob) {
		return "", false
	}
	return string(blob[1:]), true
}

// isKeyRef reports whether blob is a key reference (keyRef).
func isKeyRef(blob []byte) bool {
	return len(blob) > 1 && blob[0] == formatKeyURI && utf8.Valid(blob[1:])
}

// keyLocation describes where a provider holds e's key, for audit details:
// " (key <URI>)", or "" for a key sealed in the state.
func keyLocation(e *entry) string {
	if uri, ok := refURI(e.SealedKey); ok {
		return " (key " + uri + ")"
	}
	return ""
}
