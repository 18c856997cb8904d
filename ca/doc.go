// Package ca is Castellan's issuance pipeline: the one path every workload
// certificate takes, the certificate profile, and the trust bundle
// (Authority). The signing backends are behind the signer.Signer contract
// (package signer), the admin API is package ca/admin, CA rotation is package
// ca/rotation.
//
// One CSR, from the wire to the answer:
//
//  0. Admission, before the call is read. Admission.Tap (the gRPC tap
//     handle) refuses a call from an address whose bucket failed
//     authentications emptied (ErrRateLimited, ReasonRatePeer) or beyond the
//     server-wide bound on open calls (ReasonStreams), and starts the
//     request read timeout, which Admission.Unary (the interceptor) ends once
//     the request has arrived.
//  1. Edge. Server.CreateCertificate (Istio's IstioCertificateService)
//     turns the gRPC request into a Request and calls Issuer.Answer, which
//     adds the peer address and the clusterid header (withConn) and runs
//     Issuer.Issue. Issue takes an in-flight slot or refuses at once with
//     ErrOverloaded (ResourceExhausted): Istio's clients set no deadline, so
//     a CA that queues would stall them. Issuer.guarded runs the steps
//     below and turns a panic into ErrInternal (ReasonPanic), audited like
//     any failure.
//  2. Authentication. Issuer.authenticate asks the Authenticator (an
//     authn.Chain: client certificate, OIDC, Kubernetes token) who the
//     caller is and classifies a failure: no or bad credentials are the
//     caller's (ErrUnauthenticated) and are charged to its address's bucket
//     (Admission.chargePeer), an authenticator that cannot answer is ours
//     (ErrUnavailable).
//  3. Scope. requestedIdentity reads an explicitly requested identity (the
//     ImpersonatedIdentity metadata, or the admin API's); Admission.allowCaller
//     takes a token from the caller's bucket (callerKey) or refuses with
//     ErrRateLimited, a refusal the Admission summarises in the audit log
//     (Admission.Run) instead of one record per call; and Issuer.scope
//     decides the one SPIFFE ID the caller may receive: its own, or one the
//     NodeAuthorizer grants (ztunnel asking for a pod on its node). The CSR's
//     own SANs are never trusted.
//  4. CSR checks. ParseCSR decodes the untrusted PEM, verifies its
//     signature, accepts the key (CheckPublicKey), refuses attributes other
//     than one extension request (checkCSRAttributes) and reads the raw SAN
//     extension (subjectAltNames): absent, or exactly the granted URI, and no
//     name of any other type.
//  5. Profile. TTLPolicy.Grant turns the requested lifetime into the granted
//     one, and Issuer.sign builds the leaf template (LeafTemplate): empty
//     subject, the granted URI SAN, usages, NotBefore backdated by the
//     clock-skew allowance, a random serial, and a subject key identifier
//     derived from the key (signer.KeyID).
//  6. Signing. The BeforeSign test hook runs (fault injection), then
//     Issuer.sign hands the template to the active signer of the
//     Authority's State (signer.Signer.Sign); a backend that cannot answer
//     is ErrUnavailable, a caller that hung up meanwhile is its own reason
//     (ReasonCallerGone, callerGone), any other failure ErrInternal.
//  7. Result check. CheckIssued (with the issuer's path cache) re-checks
//     what the backend returned against what was asked for: key, SANs (from
//     the raw extension, sameNames), subject, lifetime, usages, and a chain
//     to the trust bundle, so a
//     misbehaving backend never reaches a client.
//  8. Audit. Issue fills the record (fillRecord) and appends it through the
//     Auditor, under the one audit timeout and detached from the caller's
//     context; every outcome is recorded, and a certificate whose record is
//     not committed is withheld (ErrUnavailable). Issue then counts the
//     outcome in the Metrics (Istio's citadel_* names and Castellan's own).
//  9. Response. Elements lays out [leaf, intermediates…, root bundle];
//     Issuer.Answer returns them, or marks the issuance undelivered
//     (Issuer.Undelivered) when the client has already gone. Every error
//     leaves through Status, the one place that maps an error kind (the Err*
//     sentinels, wrapped in a Refusal with its audit reason) to a gRPC code.
//
// Requests that arrive through an API whose server authenticated the
// requester (Kubernetes PodCertificateRequests and CertificateSigningRequests,
// package ca/kubesign) enter at Issuer.IssueGrant instead of Issue: their
// controller's Authorize replaces steps 2 to 4 (the apiserver checked proof
// of possession; the controller decides the identity or DNS names), and steps
// 5 to 8 are the same code (Issuer.run, Issuer.sign, CheckIssued, the audit).
//
// Certificates Castellan needs for itself (its serving certificate,
// ServingCert; the operator credential) take steps 5 to 8 through
// Issuer.IssueInternal. Operator actions are authenticated by
// Issuer.Operator and recorded by Auditor.Record.
//
// With Config.TracerProvider set, steps 2, 6 and 8 are OpenTelemetry spans
// (SpanAuthenticate, SpanSign, SpanAuditCommit) under the call's span, or
// under a SpanIssue span when no traced call started the run; they carry
// reason codes and names Castellan chose, never what the caller sent
// (tracing.go). Without it each step costs a nil check.
package ca
