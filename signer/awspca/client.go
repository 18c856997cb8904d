package awspca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"math"
	"net/http"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/aws/retry"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/service/acmpca"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/schemas"
	"github.com/aws/aws-sdk-go-v2/service/acmpca/types"
	smithy "github.com/aws/smithy-go"
	"github.com/aws/smithy-go/middleware"
	"github.com/aws/smithy-go/transport/http/protocol/awsjson"
	"golang.org/x/time/rate"

	"github.com/castellan-ca/castellan/signer"
)

// newClient builds the PCA client: the SDK's default configuration chain
// (credentials from IRSA / EKS Pod Identity, environment, shared files or
// the instance role), the CA's region, PCA's AWS JSON 1.1 protocol, retries
// that include PCA's throttling codes, and the rate limit on every attempt.
//
// AWS JSON 1.1 is the protocol PCA has served since its launch and every AWS
// SDK speaks; the Go SDK prefers Smithy RPC v2 CBOR since acmpca v1.57.0.
// Choosing JSON keeps the wire format the one this package is tested
// against (the fake in pcatest).
func newClient(ctx context.Context, cfg Config) (*acmpca.Client, error) {
	opts := []func(*config.LoadOptions) error{config.WithRegion(cfg.Region)}
	if cfg.Credentials != nil {
		opts = append(opts, config.WithCredentialsProvider(cfg.Credentials))
	}
	awsCfg, err := config.LoadDefaultConfig(ctx, opts...)
	if err != nil {
		return nil, fmt.Errorf("load AWS configuration: %w", err)
	}
	limiter := rate.NewLimiter(rate.Limit(cfg.RateLimit), max(1, int(math.Ceil(cfg.RateLimit))))
	retryer := retry.AddWithErrorCodes(retry.NewStandard(func(o *retry.StandardOptions) {
		o.MaxAttempts, o.MaxBackoff = cfg.MaxAttempts, cfg.RetryMaxBackoff
	}), "RateExceeded")
	return acmpca.NewFromConfig(awsCfg, func(o *acmpca.Options) {
		o.Protocol = awsjson.New11(schemas.ACMPrivateCA)
		if cfg.Endpoint != "" {
			o.BaseEndpoint = aws.String(cfg.Endpoint)
		}
		o.Retryer = retryer
		o.APIOptions = append(o.APIOptions, func(st *middleware.Stack) error {
			// After Retry: every attempt, retries and polls included, waits its turn.
			return st.Finalize.Insert(rateLimit{limiter}, "Retry", middleware.After)
		})
	}), nil
}

// rateLimit holds each request to PCA to the signer's rate, or fails it
// when the wait would outlast the call's deadline.
type rateLimit struct{ l *rate.Limiter }

// ID names the middleware in the SDK's stack.
func (rateLimit) ID() string { return "CastellanPCARateLimit" }

// HandleFinalize waits for the limiter, then sends the attempt.
func (m rateLimit) HandleFinalize(ctx context.Context, in middleware.FinalizeInput, next middleware.FinalizeHandler) (
	middleware.FinalizeOutput, middleware.Metadata, error) {
	if err := m.l.Wait(ctx); err != nil {
		return middleware.FinalizeOutput{}, middleware.Metadata{}, fmt.Errorf("client rate limit of calls to PCA: %w", err)
	}
	return next.HandleFinalize(ctx, in)
}

// transientCodes are PCA (and AWS-wide) error codes a later retry may cure.
// RequestFailedException is in PCA's documentation "a networking problem in
// your AWS environment": retry.
var transientCodes = map[string]bool{
	"ThrottlingException": true, "Throttling": true, "ThrottledException": true, "RequestThrottledException": true,
	"RequestThrottled": true, "TooManyRequestsException": true, "RateExceeded": true, "RequestLimitExceeded": true,
	"SlowDown": true, "RequestTimeout": true, "RequestTimeoutException": true, "ServiceUnavailable": true,
	"ServiceUnavailableException": true, "InternalFailure": true, "InternalServerError": true, "RequestFailedException": true,
}

// classify maps an SDK error: the caller's own cancellation stays a context
// error; no answer at all (network, our deadline, the waiter running out of
// time, the retry quota), throttling and server faults wrap
// signer.ErrSignerUnavailable; PCA's refusals (validation, permissions, a
// malformed CSR, the CA's certificate quota) are returned as they are.
func classify(parent context.Context, err error) error {
	if perr := parent.Err(); perr != nil {
		return fmt.Errorf("%w (%w)", perr, err)
	}
	var apiErr smithy.APIError
	if !errors.As(err, &apiErr) {
		return fmt.Errorf("%w: %w", signer.ErrSignerUnavailable, err)
	}
	var status interface{ HTTPStatusCode() int }
	serverFault := errors.As(err, &status) && (status.HTTPStatusCode() >= 500 || status.HTTPStatusCode() == http.StatusTooManyRequests)
	if transientCodes[apiErr.ErrorCode()] || serverFault || apiErr.ErrorFault() == smithy.FaultServer {
		return fmt.Errorf("%w: %w", signer.ErrSignerUnavailable, err)
	}
	return err
}

// await polls GetCertificate with the SDK's CertificateIssued waiter until
// the certificate is signed or ctx's deadline, and returns it with its
// chain (roots split off) and the root it chains to.
func (s *Signer) await(ctx context.Context, certARN string) (*signer.Chain, *x509.Certificate, error) {
	deadline, ok := ctx.Deadline()
	if !ok || !time.Now().Before(deadline) {
		return nil, nil, fmt.Errorf("no time left to wait for the certificate: %w", context.DeadlineExceeded)
	}
	w := acmpca.NewCertificateIssuedWaiter(s.client, func(o *acmpca.CertificateIssuedWaiterOptions) {
		o.MinDelay, o.MaxDelay = s.cfg.PollMinDelay, s.cfg.PollMaxDelay
		o.Retryable = whileInProgress
	})
	out, err := w.WaitForOutput(ctx, &acmpca.GetCertificateInput{
		CertificateArn:          aws.String(certARN),
		CertificateAuthorityArn: aws.String(s.cfg.CertificateAuthorityARN),
	}, time.Until(deadline))
	if err != nil {
		return nil, nil, fmt.Errorf("wait for the certificate: %w", err)
	}
	leaf, err := signer.ParseCertificatesPEM([]byte(aws.ToString(out.Certificate)))
	if err != nil {
		return nil, nil, fmt.Errorf("certificate: %w", err)
	}
	if len(leaf) != 1 {
		return nil, nil, fmt.Errorf("certificate holds %d certificates, want 1", len(leaf))
	}
	chain, err := signer.ParseCertificatesPEM([]byte(aws.ToString(out.CertificateChain)))
	if err != nil {
		return nil, nil, fmt.Errorf("certificate chain: %w", err)
	}
	inter, roots := signer.SplitRoots(chain)
	if len(roots) != 1 || !roots[0].Equal(chain[len(chain)-1]) {
		return nil, nil, fmt.Errorf("certificate chain holds %d roots, want one at its top", len(roots))
	}
	return &signer.Chain{Leaf: leaf[0], Intermediates: inter}, roots[0], nil
}

// whileInProgress keeps the waiter polling while PCA answers
// RequestInProgressException and hands back every other error as it is, so
// classify sees PCA's own answer (the SDK's default turns AccessDenied into
// an untyped error).
func whileInProgress(_ context.Context, _ *acmpca.GetCertificateInput, _ *acmpca.GetCertificateOutput, err error) (bool, error) {
	var inProgress *types.RequestInProgressException
	if errors.As(err, &inProgress) {
		return true, nil
	}
	return false, err
}
