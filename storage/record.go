// Package storage defines Castellan's audit record, its hash chain, the
// chain verifier and the string sanitiser (Sanitize) shared by every audit
// store (embedded SQLite, PostgreSQL); storage/groupcommit is their shared
// group-commit queue.
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

// ReasonRecordRejected is the reason of a substitute record (see Rejected):
// the store refused a caller's record for a data reason and stored this one
// in its place.
const ReasonRecordRejected = "audit.record_rejected"

// Sentinel errors shared by every store; match them with errors.Is.
var (
	// ErrClosed is returned by every method of a store after Close.
	ErrClosed = errors.New("storage: store closed")
	// ErrNotFound is returned by Get when no record has the given writer and seq.
	ErrNotFound = errors.New("storage: record not found")
	// ErrInvalidRecord is returned by Append for a record that fails Validate.
	ErrInvalidRecord = errors.New("storage: invalid record")
	// ErrCommitUnconfirmed is wrapped, beside the context's error, by an
	// Append whose caller gave up while its record was being committed: the
	// record may be in the log, and then an undelivered marker follows it.
	ErrCommitUnconfirmed = errors.New("storage: caller gave up while its record was being committed")
	// ErrRecordRejected is wrapped by the error a store's batch write returns
	// when the database refused a record for a data reason (not an outage),
	// and by the Append of that record: a substitute (Rejected) was stored in
	// its place while the other records of its batch committed.
	ErrRecordRejected = errors.New("storage: record refused by the database")
	// ErrSchemaTooNew is returned by a store's Open on a database migrated by
	// a newer Castellan.
	ErrSchemaTooNew = errors.New("storage: schema is newer than this binary supports")
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
	// The encoding is built in a stack buffer and hashed at once: this runs
	// for every record appended and every record verified.
	var stack [1024]byte
	b := append(stack[:0], hashDomain...)
	b = appendUint64(b, r.Seq)
	b = appendString(b, r.Writer)
	b = appendTime(b, r.Time)
	b = appendString(b, r.Kind)
	b = appendString(b, r.RequestID)
	b = appendString(b, r.Peer)
	b = appendString(b, r.AuthMethod)
	b = appendString(b, r.Caller)
	b = appendString(b, r.ClusterID)
	b = appendString(b, r.RequestedIdentity)
	b = appendString(b, r.GrantedIdentity)
	b = appendString(b, r.Outcome)
	b = appendString(b, r.Reason)
	b = appendString(b, r.Code)
	b = appendString(b, r.Serial)
	b = appendTime(b, r.NotBefore)
	b = appendTime(b, r.NotAfter)
	b = appendString(b, r.CertSHA256)
	b = appendString(b, r.Signer)
	b = appendString(b, r.IssuerKeyID)
	b = appendString(b, r.Detail)
	b = appendString(b, r.PrevHash)
	sum := sha256.Sum256(b)
	var hexSum [2 * sha256.Size]byte
	hex.Encode(hexSum[:], sum[:])
	return string(hexSum[:])
}

// Seal sets r's chain fields: Writer, Seq, PrevHash and then Hash. Stores
// call it while holding their chain head so the four fields stay consistent.
func (r *Record) Seal(writer string, seq uint64, prevHash string) {
	r.Writer = writer
	r.Seq = seq
	r.PrevHash = prevHash
	r.Hash = r.ComputeHash()
}

// appendUint64, appendString and appendTime append the canonical encoding
// of one field to b.
func appendUint64(b []byte, v uint64) []byte { return binary.BigEndian.AppendUint64(b, v) }

func appendString(b []byte, s string) []byte {
	return append(appendUint64(b, uint64(len(s))), s...)
}

func appendTime(b []byte, t time.Time) []byte {
	if t.IsZero() {
		return append(b, 0)
	}
	b = binary.BigEndian.AppendUint64(append(b, 1), uint64(t.Unix())) //nolint:gosec // G115: two's complement, a bijection on int64 (times before 1970 too); stored chains fix this encoding
	return binary.BigEndian.AppendUint32(b, uint32(t.Nanosecond()))   //nolint:gosec // G115: Nanosecond is in [0, 1e9)
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

// Rejected returns the record stored in place of orig when the database
// refused orig for a data reason: orig's Time, Kind and RequestID (which
// link it to the server's log line), OutcomeFailed and ReasonRecordRejected.
// It copies nothing else, so that whatever made orig unacceptable is not in
// it; its chain fields are left for the store.
func Rejected(orig *Record) *Record {
	return &Record{Time: orig.Time, Kind: orig.Kind, RequestID: orig.RequestID, Outcome: OutcomeFailed,
		Reason: ReasonRecordRejected,
		Detail: "the audit store refused this request's record for a data reason; this record stands in its place (cause in the server log)"}
}
