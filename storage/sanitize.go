package storage

import (
	"errors"
	"fmt"
	"unicode/utf8"
)

// Bounds, in bytes, of the string fields of a Record (see Record.Sanitize).
// They keep one record small and every indexed column far below
// PostgreSQL's btree entry limit (2704 bytes, writer and seq included).
const (
	// MaxCodeLen bounds machine codes and hex: Kind, Outcome, Reason, Code,
	// AuthMethod, Signer, RequestID, Serial, CertSHA256, IssuerKeyID.
	MaxCodeLen = 128
	// MaxNameLen bounds names a caller influences: Peer, Caller, ClusterID,
	// RequestedIdentity, GrantedIdentity.
	MaxNameLen = 2048
	// MaxDetailLen bounds free text: Detail.
	MaxDetailLen = 4096
	// MaxWriterLen bounds a writer id; stores refuse a longer one at open.
	MaxWriterLen = 256
)

// Truncated ends a string that Sanitize cut to its bound.
const Truncated = "…"

// Sanitize returns s as it may be stored in an audit record or printed in a
// log line, at most limit bytes long. Every caller-influenced string passes
// through it, so that one hostile value can neither be refused by a database
// (taking a whole group-commit batch down) nor forge output:
//
//   - the result is valid UTF-8: each byte of an invalid sequence (including
//     UTF-8-encoded surrogates and overlong forms) becomes U+FFFD;
//   - C0 control characters (NUL, ESC, CR, LF, TAB, ...) become their
//     visible Control Pictures (U+2400..U+241F, e.g. NUL → "␀"), DEL becomes
//     "␡"; C1 controls (U+0080..U+009F), bidirectional formatting characters
//     (U+061C, U+200E, U+200F, U+202A..U+202E, U+2066..U+2069) and the line
//     and paragraph separators (U+2028, U+2029) become U+FFFD;
//   - a result longer than limit is cut on a character boundary and ends in
//     Truncated, within limit (for limit < len(Truncated), just cut).
//
// It is deterministic and idempotent (Sanitize(Sanitize(s, n), n) ==
// Sanitize(s, n)), returns s itself without allocating when s is already
// clean and short enough, and reads at most about limit bytes of a long s.
func Sanitize(s string, limit int) string {
	if limit < 0 {
		limit = 0
	}
	// Fast path: scan for the first byte or character that needs work,
	// no further than the bound.
	i := 0
	for i < len(s) && i <= limit {
		c := s[i]
		if c >= 0x20 && c < 0x7f {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			break // C0 control or DEL
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if replacement(r, size) != 0 {
			break
		}
		i += size
	}
	if i == len(s) && len(s) <= limit {
		return s
	}

	// Copy the clean prefix (up to a character boundary within limit), then
	// go character by character until the input ends or the bound is hit.
	p := min(i, limit)
	for p > 0 && p < len(s) && !utf8.RuneStart(s[p]) {
		p--
	}
	out := make([]byte, 0, min(len(s), limit)+utf8.UTFMax)
	out = append(out, s[:p]...)
	var rb [utf8.UTFMax]byte
	for j := p; j < len(s); {
		r, size := utf8.DecodeRuneInString(s[j:])
		piece := []byte(s[j : j+size])
		if rep := replacement(r, size); rep != 0 {
			piece = rb[:utf8.EncodeRune(rb[:], rep)]
		}
		if len(out)+len(piece) > limit {
			return string(truncate(out, limit))
		}
		out = append(out, piece...)
		j += size
	}
	return string(out)
}

// replacement returns what the character r (size bytes of input) becomes,
// or 0 when it stays as it is.
func replacement(r rune, size int) rune {
	switch {
	case r == utf8.RuneError && size <= 1:
		return utf8.RuneError // invalid byte
	case r < 0x20:
		return 0x2400 + r // Control Pictures: NUL → ␀, ESC → ␛, LF → ␊
	case r == 0x7f:
		return 0x2421 // ␡
	case r >= 0x80 && r <= 0x9f, // C1 controls
		r == 0x061c, r == 0x200e, r == 0x200f, // bidi marks
		r >= 0x202a && r <= 0x202e, // bidi embeddings and overrides
		r >= 0x2066 && r <= 0x2069, // bidi isolates
		r == 0x2028, r == 0x2029:   // line and paragraph separators
		return utf8.RuneError
	}
	return 0
}

// truncate shortens out (valid UTF-8 by construction) by whole characters
// so that out+Truncated fits in limit bytes, and appends Truncated.
func truncate(out []byte, limit int) []byte {
	if limit < len(Truncated) {
		return out
	}
	for len(out) > limit-len(Truncated) {
		_, size := utf8.DecodeLastRune(out)
		out = out[:len(out)-size]
	}
	return append(out, Truncated...)
}

// Sanitize applies Sanitize to every string field a caller sets, each with
// its bound (MaxCodeLen, MaxNameLen, MaxDetailLen). The chain fields
// (Writer, PrevHash, Hash) belong to the store and are left alone. Stores
// call it on every record before sealing it, so no caller can forget it.
func (r *Record) Sanitize() {
	r.Kind = Sanitize(r.Kind, MaxCodeLen)
	r.RequestID = Sanitize(r.RequestID, MaxCodeLen)
	r.Peer = Sanitize(r.Peer, MaxNameLen)
	r.AuthMethod = Sanitize(r.AuthMethod, MaxCodeLen)
	r.Caller = Sanitize(r.Caller, MaxNameLen)
	r.ClusterID = Sanitize(r.ClusterID, MaxNameLen)
	r.RequestedIdentity = Sanitize(r.RequestedIdentity, MaxNameLen)
	r.GrantedIdentity = Sanitize(r.GrantedIdentity, MaxNameLen)
	r.Outcome = Sanitize(r.Outcome, MaxCodeLen)
	r.Reason = Sanitize(r.Reason, MaxCodeLen)
	r.Code = Sanitize(r.Code, MaxCodeLen)
	r.Serial = Sanitize(r.Serial, MaxCodeLen)
	r.CertSHA256 = Sanitize(r.CertSHA256, MaxCodeLen)
	r.Signer = Sanitize(r.Signer, MaxCodeLen)
	r.IssuerKeyID = Sanitize(r.IssuerKeyID, MaxCodeLen)
	r.Detail = Sanitize(r.Detail, MaxDetailLen)
}

// Sanitized returns q with its equality filters rewritten as
// Record.Sanitize rewrites the fields they match, so that a search with the
// raw value a caller sent finds the record as stored, and no value a
// database refuses reaches it.
func (q Query) Sanitized() Query {
	q.Identity = Sanitize(q.Identity, MaxNameLen)
	q.Serial = Sanitize(q.Serial, MaxCodeLen)
	q.CertSHA256 = Sanitize(q.CertSHA256, MaxCodeLen)
	q.Outcome = Sanitize(q.Outcome, MaxCodeLen)
	q.Writer = Sanitize(q.Writer, MaxWriterLen)
	q.AfterWriter = Sanitize(q.AfterWriter, MaxWriterLen)
	q.IssuerKeyID = Sanitize(q.IssuerKeyID, MaxCodeLen)
	return q
}

// ErrInvalidWriter is returned by a store's Open for a writer id that is
// empty, longer than MaxWriterLen or not left unchanged by Sanitize.
var ErrInvalidWriter = errors.New("storage: invalid writer id")

// ValidateWriter reports whether w can name a chain. Writer ids come from
// configuration, so a bad one is refused at start-up rather than rewritten.
func ValidateWriter(w string) error {
	if w == "" || len(w) > MaxWriterLen || Sanitize(w, MaxWriterLen) != w {
		return fmt.Errorf("%w: %q (want 1..%d bytes of printable UTF-8)", ErrInvalidWriter, w, MaxWriterLen)
	}
	return nil
}
