package storage

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Stores written before audit fields were sanitised (Sanitize) may hold
// strings that are not valid UTF-8, and their hashes cover those exact
// bytes. JSON and protobuf strings are Unicode: encoding/json would replace
// each bad byte with U+FFFD and protobuf refuses to marshal it, so such a
// record could neither be listed nor exported and verified. Both encodings
// therefore carry a record as its readable form (bad bytes replaced) plus
// the exact bytes of every field that differs (SplitInvalidUTF8), and
// decoders put them back (JoinInvalidUTF8).

// stringField is one string field of a Record and its JSON name.
type stringField struct {
	name string
	p    *string
}

// stringFields lists every string field of r by its JSON name, in
// declaration order (a test checks the list against the struct).
func (r *Record) stringFields() []stringField {
	return []stringField{
		{"writer", &r.Writer}, {"kind", &r.Kind}, {"request_id", &r.RequestID}, {"peer", &r.Peer},
		{"auth_method", &r.AuthMethod}, {"caller", &r.Caller}, {"cluster_id", &r.ClusterID},
		{"requested_identity", &r.RequestedIdentity}, {"granted_identity", &r.GrantedIdentity},
		{"outcome", &r.Outcome}, {"reason", &r.Reason}, {"code", &r.Code}, {"serial", &r.Serial},
		{"cert_sha256", &r.CertSHA256}, {"signer", &r.Signer}, {"issuer_key_id", &r.IssuerKeyID},
		{"detail", &r.Detail}, {"prev_hash", &r.PrevHash}, {"hash", &r.Hash},
	}
}

// SplitInvalidUTF8 returns a copy of r whose string fields are valid UTF-8
// (each run of invalid bytes replaced by U+FFFD) and, by JSON field name,
// the exact bytes of every field that was not; nil when all were valid.
func (r *Record) SplitInvalidUTF8() (Record, map[string][]byte) {
	out := *r
	var raw map[string][]byte
	for _, f := range out.stringFields() {
		if utf8.ValidString(*f.p) {
			continue
		}
		if raw == nil {
			raw = make(map[string][]byte)
		}
		raw[f.name] = []byte(*f.p)
		*f.p = strings.ToValidUTF8(*f.p, "\uFFFD")
	}
	return out, raw
}

// JoinInvalidUTF8 undoes SplitInvalidUTF8: it sets each field raw names to
// its exact bytes. A name that is not a string field of Record is an error.
func (r *Record) JoinInvalidUTF8(raw map[string][]byte) error {
	if len(raw) == 0 {
		return nil
	}
	fields := r.stringFields()
	for name, b := range raw {
		i := 0
		for i < len(fields) && fields[i].name != name {
			i++
		}
		if i == len(fields) {
			return fmt.Errorf("storage: invalid_utf8 names %q, which is not a string field of a record", name)
		}
		*fields[i].p = string(b)
	}
	return nil
}

// recordJSON is Record without its JSON methods, for encoding/json.
type recordJSON Record

// recordWire is a Record's JSON object: its fields, plus the exact bytes of
// those that are not valid UTF-8 (base64, by field name).
type recordWire struct {
	*recordJSON
	InvalidUTF8 map[string][]byte `json:"invalid_utf8,omitempty"`
}

// MarshalJSON encodes r with its fields' JSON names; a field that is not
// valid UTF-8 appears readable (U+FFFD for bad bytes) and, exactly, under
// "invalid_utf8" (see SplitInvalidUTF8), so that the JSON form keeps the
// bytes the record's hash covers.
func (r *Record) MarshalJSON() ([]byte, error) {
	valid, raw := r.SplitInvalidUTF8()
	return json.Marshal(recordWire{(*recordJSON)(&valid), raw})
}

// UnmarshalJSON decodes what MarshalJSON encodes, exact bytes included.
func (r *Record) UnmarshalJSON(b []byte) error {
	return r.decodeJSON(b, false)
}

// decodeJSON decodes one record object into r; strict refuses fields
// Record does not have.
func (r *Record) decodeJSON(b []byte, strict bool) error {
	*r = Record{}
	w := recordWire{recordJSON: (*recordJSON)(r)}
	dec := json.NewDecoder(bytes.NewReader(b))
	if strict {
		dec.DisallowUnknownFields()
	}
	if err := dec.Decode(&w); err != nil {
		return err
	}
	return r.JoinInvalidUTF8(w.InvalidUTF8)
}
