package storage

import (
	"errors"
	"time"
)

// CA roles.
const (
	// RoleRoot is a self-signed root of the trust bundle.
	RoleRoot = "root"
	// RoleIntermediate is a CA signed by a root that issues leaves.
	RoleIntermediate = "intermediate"
)

// CA sources.
const (
	// SourceManaged marks a CA whose key Castellan generated and holds.
	SourceManaged = "managed"
	// SourceExternal marks a CA read from the operator's files (cacerts); its
	// key never reaches the store.
	SourceExternal = "external"
)

// CA phases (DESIGN.md §6).
const (
	// PhasePrepared: in the trust bundle (roots), not yet issuing.
	PhasePrepared = "prepared"
	// PhaseActive: issuing (or the root of the issuing chain).
	PhaseActive = "active"
	// PhasePrevious: no longer issuing, still trusted while certificates it
	// issued live.
	PhasePrevious = "previous"
	// PhaseRetired: out of the trust bundle, key erased; kept as history.
	PhaseRetired = "retired"
)

// ErrConflict is returned by a CA store's Save when the stored version is not
// the one the caller read: another replica changed the state in between.
var ErrConflict = errors.New("storage: CA state changed concurrently")

// CARecord is one CA of the rotation state: a key and its certificate.
type CARecord struct {
	// KeyID is the hex SubjectKeyId of the certificate, unique per key.
	KeyID string `json:"keyId"`
	// Role is RoleRoot or RoleIntermediate.
	Role string `json:"role"`
	// RootID is the KeyID of the root this CA chains to (its own for a root).
	RootID string `json:"rootId"`
	// Source is SourceManaged or SourceExternal.
	Source string `json:"source"`
	// Phase is one of the Phase* constants.
	Phase string `json:"phase"`
	// CertDER is the CA certificate.
	CertDER []byte `json:"cert"`
	// SealedKey is the private key as sealed by the rotation manager
	// (encrypted under the key-encryption key when one is configured), or,
	// for a key held by a key provider (HSM, KMS), only the key's URI; the
	// first byte says which. Empty for external CAs and once retired.
	SealedKey []byte `json:"sealedKey,omitempty"`
	// Phase change times; zero until the phase is reached.
	PreparedAt    time.Time `json:"preparedAt,omitzero"`
	ActivatedAt   time.Time `json:"activatedAt,omitzero"`
	DeactivatedAt time.Time `json:"deactivatedAt,omitzero"`
	RetiredAt     time.Time `json:"retiredAt,omitzero"`
}

// CAState is the stored rotation state.
type CAState struct {
	// Version increases with every Save; 0 means nothing was ever saved.
	Version uint64 `json:"version"`
	// CAs lists every CA, retired ones included.
	CAs []CARecord `json:"cas"`
	// Dependents maps a CA KeyID to an upper bound of the NotAfter of every
	// certificate it issued (RaiseDependents); absent when it issued none.
	Dependents map[string]time.Time `json:"dependents,omitempty"`
}
