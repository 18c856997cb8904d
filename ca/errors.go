package ca

import "errors"

// Error kinds of the issuance pipeline. Each is mapped to one gRPC code in
// status.go; everything else in the package wraps one of them.
var (
	// ErrUnauthenticated: the caller proved no identity, or not one that allows this request.
	ErrUnauthenticated = errors.New("unauthenticated")
	// ErrPermissionDenied: the caller is known but may not use this API.
	ErrPermissionDenied = errors.New("permission denied")
	// ErrInvalidRequest: the request itself is malformed or asks for something never granted.
	ErrInvalidRequest = errors.New("invalid request")
	// ErrTTLTooLong: the requested validity is above the maximum and the policy refuses.
	ErrTTLTooLong = errors.New("validity too long")
	// ErrKeyType: the CSR's key type or size is not accepted.
	ErrKeyType = errors.New("unsupported key")
	// ErrUnavailable: a dependency (audit store, signer backend) failed; a retry may succeed.
	ErrUnavailable = errors.New("unavailable")
	// ErrOverloaded: too many requests in flight; the caller should back off and retry.
	ErrOverloaded = errors.New("overloaded")
	// ErrRateLimited: the caller (or its address) exceeded its rate limit; it
	// should back off and retry.
	ErrRateLimited = errors.New("rate limited")
	// ErrInternal: the CA itself misbehaved (e.g. a backend returned a wrong certificate).
	ErrInternal = errors.New("internal error")
	// ErrNotFound: an admin API lookup matched nothing.
	ErrNotFound = errors.New("not found")
	// ErrPrecondition: an operator action refused in the current state (e.g. a
	// prune over a chain that does not verify); the detail is shown to the operator.
	ErrPrecondition = errors.New("failed precondition")
)
