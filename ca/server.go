package ca

import (
	"context"

	authpb "github.com/castellan-ca/castellan/proto/istio/v1/auth"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
)

// Server is the gRPC edge of Istio's IstioCertificateService, a thin
// translation onto the Issuer (the admin API is package ca/admin). Errors
// leave here through Status only.
type Server struct {
	authpb.UnimplementedIstioCertificateServiceServer

	Issuer *Issuer
}

// CreateCertificate implements Istio's CA API.
func (s *Server) CreateCertificate(ctx context.Context, in *authpb.IstioCertificateRequest) (*authpb.IstioCertificateResponse, error) {
	req := Request{CSR: in.GetCsr(), ValiditySeconds: in.GetValidityDuration()}
	if md := in.GetMetadata(); md != nil {
		req.Metadata = md.AsMap()
	}
	elements, err := s.Issuer.Answer(ctx, req)
	if err != nil {
		return nil, err
	}
	return &authpb.IstioCertificateResponse{CertChain: elements}, nil
}

// Answer runs req for the gRPC call in ctx (its peer and clusterid header
// are audited) and returns the response elements, or the call's status
// error. A certificate issued for a client that has already gone is marked
// undelivered in the audit log instead of being counted as held by somebody.
func (is *Issuer) Answer(ctx context.Context, req Request) ([]string, error) {
	out, err := is.Issue(ctx, withConn(ctx, req))
	if err != nil {
		return nil, Status(err).Err()
	}
	if cerr := ctx.Err(); cerr != nil {
		is.Undelivered(ctx, out, cerr)
		return nil, Status(cerr).Err()
	}
	return out.Elements, nil
}

// Undelivered appends a follow-up record (storage.Undelivered) saying that
// out's certificate was issued and audited but never reached the client.
// A failure to append it is logged and counted: the issuance record stands.
func (is *Issuer) Undelivered(ctx context.Context, out *Issued, cause error) {
	m := storage.Undelivered(&out.Record, is.cfg.Now(), storage.ReasonResponseLost, "response not sent: "+cause.Error())
	if err := is.audit.Append(ctx, m); err != nil {
		is.cfg.Logger.Error("audit of an undelivered certificate failed", "request_id", out.Record.RequestID,
			"serial", out.Record.Serial, "error", err)
		return
	}
	is.cfg.Logger.Warn("certificate not delivered: client gone", "request_id", out.Record.RequestID,
		"serial", out.Record.Serial, "cause", cause)
}

// withConn adds what the connection says about the request: peer address and
// the clusterid header.
func withConn(ctx context.Context, req Request) Request {
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		req.Peer = p.Addr.String()
	}
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		if v := md.Get("clusterid"); len(v) > 0 {
			req.ClusterID = v[0]
		}
	}
	return req
}
