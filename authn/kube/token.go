package kube

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"time"

	"google.golang.org/grpc/metadata"
)

// maxTokenBytes bounds the bearer tokens we look at: service-account tokens
// are about 1 KiB, and nothing larger is worth a TokenReview.
const maxTokenBytes = 16 << 10

// saUserPrefix starts the username of every service account.
const saUserPrefix = "system:serviceaccount:"

// saGroup is the group every service account is in.
const saGroup = "system:serviceaccounts"

// bearerToken returns the token of the request's `authorization: Bearer`
// header, or "" when there is none (another authenticator's credential, or
// no credential at all).
func bearerToken(md metadata.MD) string {
	v := md.Get("authorization")
	if len(v) == 0 {
		return ""
	}
	scheme, token, ok := strings.Cut(v[0], " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") {
		return ""
	}
	return strings.TrimSpace(token)
}

// parseServiceAccount splits a username system:serviceaccount:<ns>:<sa>.
func parseServiceAccount(user string) (ns, sa string, err error) {
	rest, ok := strings.CutPrefix(user, saUserPrefix)
	if !ok {
		return "", "", fmt.Errorf("user %q is not a service account", user)
	}
	ns, sa, ok = strings.Cut(rest, ":")
	if !ok || ns == "" || sa == "" || strings.Contains(sa, ":") {
		return "", "", fmt.Errorf("user %q is not system:serviceaccount:<namespace>:<name>", user)
	}
	return ns, sa, nil
}

// unverifiedExpiry reads the exp claim of a JWT WITHOUT checking its
// signature. It only bounds how long a result the apiserver vouched for may be
// cached; it must never be used to accept a token.
func unverifiedExpiry(token string) (time.Time, error) {
	payload, err := unverifiedPayload(token)
	if err != nil {
		return time.Time{}, err
	}
	var claims struct {
		Exp *float64 `json:"exp"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return time.Time{}, fmt.Errorf("token claims: %w", err)
	}
	if claims.Exp == nil {
		return time.Time{}, errors.New("token has no exp claim")
	}
	return numericDate(*claims.Exp)
}

// unverifiedPayload returns the decoded middle part of a compact JWS.
func unverifiedPayload(token string) ([]byte, error) {
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		return nil, errors.New("token is not a compact JWT")
	}
	// Base64url without padding (RFC 7515); tolerate padding, as some issuers add it.
	payload, err := base64.RawURLEncoding.DecodeString(strings.TrimRight(parts[1], "="))
	if err != nil {
		return nil, fmt.Errorf("token payload: %w", err)
	}
	return payload, nil
}

// numericDate converts a JWT NumericDate (seconds since the epoch, possibly
// fractional) to a time, refusing values no real token carries.
func numericDate(f float64) (time.Time, error) {
	if math.IsNaN(f) || f < 0 || f > 1e11 {
		return time.Time{}, fmt.Errorf("NumericDate %v out of range", f)
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)).UTC(), nil
}
