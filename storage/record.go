// Package storage defines Castellan's audit record, its hash chain and the
// chain verifier shared by every audit store (embedded SQLite, PostgreSQL).
//
// Stores return plain Go errors wrapped with %w; mapping them to gRPC codes is
// the caller's job.
package storage

import (
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"time"
)

// Record kinds.
const (
	// KindCSR marks the outcome of one CreateCertificate call.
	KindCSR = "csr"
	// KindOperator marks an operator action (rotation, configuration reload, ...).
	KindOperator = "operator"
)

// Record outcomes.
const (
	// OutcomeIssued means a certificate was issued.
	OutcomeIssued = "issued"
	// OutcomeRefused means the request was refused by policy or validation.
	OutcomeRefused = "refused"
	// OutcomeFailed means a transient server-side failure prevented issuance.
	OutcomeFailed = "failed"
	// OutcomeOK is the outcome of a successful operator action.
	OutcomeOK = "ok"
	// OutcomeUndelivered marks a follow-up record: the record it names (same
	// RequestID and Serial, seq in Detail) is in the log, but its certificate
	// never reached the client (see Undelivered).
	OutcomeUndelivered = "undelivered"
)

// Reasons of undelivered markers.
const (
	// ReasonCommitUnconfirmed: the store reported the append as failed (its
	// caller gave up waiting, or the commit's acknowledgement was lost) but the
	// record was committed, so its certificate was withheld.
	ReasonCommitUnconfirmed = "audit.commit_unconfirmed"
	// ReasonResponseLost: the record was committed but the response carrying
	// the certificate could not be sent (the client had gone).
	ReasonResponseLost = "delivery.response_lost"
)

// Sentinel errors shared by every store; match them with errors.Is.
var (
	// ErrClosed is returned by every method of a store after Close.
	ErrClosed = errors.New("storage: store closed")
	// ErrNotFound is returned by Get when no record has the given writer and seq.
	ErrNotFound = errors.New("storage: record not found")
	// ErrInvalidRecord is returned by Append for a record that fails Validate.
	ErrInvalidRecord = errors.New("storage: invalid record")
)

// Record is one audit entry: a CreateCertificate outcome or an operator action.
type Record struct {
	Seq               uint64    `json:"seq"`    // position in its writer's chain, from 1; assigned by the store
	Writer            string    `json:"writer"` // id of the process instance whose chain holds it; assigned by the store
	Time              time.Time `json:"time"`   // set by caller (UTC), store fills if zero
	Kind              string    `json:"kind"`   // KindCSR | KindOperator
	RequestID         string    `json:"request_id,omitempty"`
	Peer              string    `json:"peer,omitempty"`
	AuthMethod        string    `json:"auth_method,omitempty"` // e.g. "mtls", "kubernetes", "oidc", "operator"
	Caller            string    `json:"caller,omitempty"`      // caller identity
	ClusterID         string    `json:"cluster_id,omitempty"`
	RequestedIdentity string    `json:"requested_identity,omitempty"`
	GrantedIdentity   string    `json:"granted_identity,omitempty"`
	Outcome           string    `json:"outcome"`          // OutcomeIssued | OutcomeRefused | OutcomeFailed | OutcomeOK
	Reason            string    `json:"reason,omitempty"` // machine reason code, e.g. "csr.bad_signature"
	Code              string    `json:"code,omitempty"`   // gRPC code name returned, e.g. "InvalidArgument"
	Serial            string    `json:"serial,omitempty"` // lowercase hex
	NotBefore         time.Time `json:"not_before,omitzero"`
	NotAfter          time.Time `json:"not_after,omitzero"`
	CertSHA256        string    `json:"cert_sha256,omitempty"`   // lowercase hex of SHA-256 over leaf DER
	Signer            string    `json:"signer,omitempty"`        // backend name
	IssuerKeyID       string    `json:"issuer_key_id,omitempty"` // hex of issuing CA's SubjectKeyId
	Detail            string    `json:"detail,omitempty"`        // free text, operator actions
	PrevHash          string    `json:"prev_hash"`               // hex; "" for Seq 1
	Hash              string    `json:"hash"`                    // hex SHA-256 over the canonical encoding (see ComputeHash)
}

// Bounds of Record.Time: stores keep it as int64 Unix nanoseconds so that
// time-range queries use an index, which limits it to years 1678..2262.
var (
	minRecordTime = time.Unix(0, -1<<63)
	maxRecordTime = time.Unix(0, 1<<63-1)
)

// Validate reports whether r can be stored: Kind and Outcome set, Time
// representable in Unix nanoseconds, NotBefore/NotAfter within years 0..9999
// (so that they round-trip through RFC 3339). The error wraps ErrInvalidRecord.
func (r *Record) Validate() error {
	switch {
	case r.Kind == "":
		return fmt.Errorf("%w: kind is empty", ErrInvalidRecord)
	case r.Outcome == "":
		return fmt.Errorf("%w: outcome is empty", ErrInvalidRecord)
	case !r.Time.IsZero() && (r.Time.Before(minRecordTime) || r.Time.After(maxRecordTime)):
		return fmt.Errorf("%w: time %s out of range", ErrInvalidRecord, r.Time)
	case !validCertTime(r.NotBefore):
		return fmt.Errorf("%w: not_before %s out of range", ErrInvalidRecord, r.NotBefore)
	case !validCertTime(r.NotAfter):
		return fmt.Errorf("%w: not_after %s out of range", ErrInvalidRecord, r.NotAfter)
	}
	return nil
}

func validCertTime(t time.Time) bool {
	if t.IsZero() {
		return true
	}
	y := t.UTC().Year()
	return y >= 0 && y <= 9999
}

// hashDomain separates this encoding from any other use of SHA-256 and
// versions it: a future encoding gets a new prefix, never a silent change.
const hashDomain = "castellan.audit.record.v1\x00"

// ComputeHash returns the lowercase hex SHA-256 of r's canonical encoding:
// every field except Hash, in declaration order, strings as an 8-byte
// big-endian length followed by the bytes, Seq as 8 bytes big-endian, and
// times as a presence byte followed (when non-zero) by Unix seconds (8 bytes)
// and nanoseconds (4 bytes). Fixed order plus length prefixes make the
// encoding injective: two different records never encode the same bytes.
// Locations and monotonic readings do not affect the hash.
func (r *Record) ComputeHash() string {
	e := encoder{h: sha256.New()}
	e.h.Write([]byte(hashDomain))
	e.uint64(r.Seq)
	e.string(r.Writer)
	e.time(r.Time)
	e.string(r.Kind)
	e.string(r.RequestID)
	e.string(r.Peer)
	e.string(r.AuthMethod)
	e.string(r.Caller)
	e.string(r.ClusterID)
	e.string(r.RequestedIdentity)
	e.string(r.GrantedIdentity)
	e.string(r.Outcome)
	e.string(r.Reason)
	e.string(r.Code)
	e.string(r.Serial)
	e.time(r.NotBefore)
	e.time(r.NotAfter)
	e.string(r.CertSHA256)
	e.string(r.Signer)
	e.string(r.IssuerKeyID)
	e.string(r.Detail)
	e.string(r.PrevHash)
	var sum [sha256.Size]byte
	return hex.EncodeToString(e.h.Sum(sum[:0]))
}

// Seal sets r's chain fields: Writer, Seq, PrevHash and then Hash. Stores
// call it while holding their chain head so the four fields stay consistent.
func (r *Record) Seal(writer string, seq uint64, prevHash string) {
	r.Writer = writer
	r.Seq = seq
	r.PrevHash = prevHash
	r.Hash = r.ComputeHash()
}

type encoder struct {
	h   hash.Hash
	buf [13]byte
}

func (e *encoder) uint64(v uint64) {
	binary.BigEndian.PutUint64(e.buf[:8], v)
	e.h.Write(e.buf[:8])
}

func (e *encoder) string(s string) {
	e.uint64(uint64(len(s)))
	e.h.Write([]byte(s))
}

func (e *encoder) time(t time.Time) {
	if t.IsZero() {
		e.buf[0] = 0
		e.h.Write(e.buf[:1])
		return
	}
	e.buf[0] = 1
	binary.BigEndian.PutUint64(e.buf[1:9], uint64(t.Unix()))        //nolint:gosec // G115: two's complement, a bijection on int64 (times before 1970 too); stored chains fix this encoding
	binary.BigEndian.PutUint32(e.buf[9:13], uint32(t.Nanosecond())) //nolint:gosec // G115: Nanosecond is in [0, 1e9)
	e.h.Write(e.buf[:13])
}

// Query limits.
const (
	// DefaultLimit is the number of records List returns when Query.Limit is 0.
	DefaultLimit = 100
	// MaxLimit caps Query.Limit so one call cannot load an unbounded result.
	MaxLimit = 10000
)

// Query selects records for List. Zero-valued fields do not filter. Results
// are ordered by (Writer, Seq) ascending, so a caller pages through one chain
// with Writer set and AfterSeq = the last Seq seen.
type Query struct {
	Identity   string    // matches GrantedIdentity or RequestedIdentity
	Serial     string    // exact, lowercase hex
	CertSHA256 string    // exact, lowercase hex
	Outcome    string    // exact
	Since      time.Time // Time >= Since
	Until      time.Time // Time < Until
	AfterSeq   uint64    // Seq > AfterSeq
	Writer     string    // exact
	Limit      int       // 0 (or negative) means DefaultLimit; capped at MaxLimit
	// AfterWriter, when set, pages across writers: only records after
	// (AfterWriter, AfterSeq) in (Writer, Seq) order. It replaces the plain
	// AfterSeq filter.
	AfterWriter string
	IssuerKeyID string // exact, lowercase hex
}

// EffectiveLimit returns the number of rows List may return for q.
func (q Query) EffectiveLimit() int {
	switch {
	case q.Limit <= 0:
		return DefaultLimit
	case q.Limit > MaxLimit:
		return MaxLimit
	}
	return q.Limit
}

// Undelivered returns the follow-up record that marks orig (a committed
// record) as not delivered: the certificate it describes was withheld or
// lost, so an inventory must not count it as held by anyone. Records are
// append-only, hence a new record rather than an update. The marker copies
// orig's identifying fields; its chain fields are left for the store.
func Undelivered(orig *Record, at time.Time, reason, why string) *Record {
	return &Record{
		Time: at.UTC(), Kind: orig.Kind, RequestID: orig.RequestID, Peer: orig.Peer, AuthMethod: orig.AuthMethod,
		Caller: orig.Caller, ClusterID: orig.ClusterID, RequestedIdentity: orig.RequestedIdentity,
		GrantedIdentity: orig.GrantedIdentity, Outcome: OutcomeUndelivered, Reason: reason, Serial: orig.Serial,
		NotBefore: orig.NotBefore, NotAfter: orig.NotAfter, CertSHA256: orig.CertSHA256, Signer: orig.Signer,
		IssuerKeyID: orig.IssuerKeyID,
		Detail:      fmt.Sprintf("record %s/%d (outcome %s) was not delivered: %s", orig.Writer, orig.Seq, orig.Outcome, why),
	}
}
