package kmsfake

import (
	"context"
	"crypto"
	"crypto/elliptic"
	"encoding/pem"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"

	"cloud.google.com/go/kms/apiv1/kmspb"
	"google.golang.org/api/option"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// Google is a Google Cloud KMS on 127.0.0.1: a gRPC server on the real
// kmspb service definition (key rings, asymmetric-sign crypto keys and
// their versions, GetPublicKey, AsymmetricSign).
type Google struct {
	kmspb.UnimplementedKeyManagementServiceServer
	keyring

	// Addr is the 127.0.0.1:PORT the server listens on.
	Addr string

	gmu      sync.Mutex
	rings    map[string]bool
	cryptoKs map[string]*kmspb.CryptoKey
	versions map[string]int // crypto key → versions made
}

// NewGoogle starts a fake Google Cloud KMS, stopped at the end of the test.
func NewGoogle(t testing.TB) *Google {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := &Google{Addr: l.Addr().String(), rings: map[string]bool{}, cryptoKs: map[string]*kmspb.CryptoKey{}, versions: map[string]int{}}
	srv := grpc.NewServer()
	kmspb.RegisterKeyManagementServiceServer(srv, g)
	go func() { _ = srv.Serve(l) }()
	t.Cleanup(srv.Stop)
	return g
}

// ClientOptions point the real client library at the fake: its endpoint,
// no credentials, plaintext gRPC.
func (g *Google) ClientOptions() []option.ClientOption {
	return []option.ClientOption{
		option.WithEndpoint(g.Addr),
		option.WithoutAuthentication(),
		option.WithGRPCDialOption(grpc.WithTransportCredentials(insecure.NewCredentials())),
	}
}

func (g *Google) check() error {
	if g.down.Load() {
		return status.Error(codes.Unavailable, "the fake is down")
	}
	return nil
}

// GetKeyRing returns a key ring made by CreateKeyRing.
func (g *Google) GetKeyRing(_ context.Context, req *kmspb.GetKeyRingRequest) (*kmspb.KeyRing, error) {
	if err := g.check(); err != nil {
		return nil, err
	}
	g.gmu.Lock()
	defer g.gmu.Unlock()
	if !g.rings[req.GetName()] {
		return nil, status.Errorf(codes.NotFound, "key ring %s not found", req.GetName())
	}
	return &kmspb.KeyRing{Name: req.GetName()}, nil
}

// CreateKeyRing makes a key ring.
func (g *Google) CreateKeyRing(_ context.Context, req *kmspb.CreateKeyRingRequest) (*kmspb.KeyRing, error) {
	if err := g.check(); err != nil {
		return nil, err
	}
	name := req.GetParent() + "/keyRings/" + req.GetKeyRingId()
	g.gmu.Lock()
	defer g.gmu.Unlock()
	if g.rings[name] {
		return nil, status.Errorf(codes.AlreadyExists, "key ring %s exists", name)
	}
	g.rings[name] = true
	return &kmspb.KeyRing{Name: name}, nil
}

// googleAlgs maps a version algorithm to the key made.
var googleAlgs = map[kmspb.CryptoKeyVersion_CryptoKeyVersionAlgorithm]struct {
	curve elliptic.Curve
	bits  int
}{
	kmspb.CryptoKeyVersion_EC_SIGN_P256_SHA256:        {elliptic.P256(), 0},
	kmspb.CryptoKeyVersion_EC_SIGN_P384_SHA384:        {elliptic.P384(), 0},
	kmspb.CryptoKeyVersion_RSA_SIGN_PKCS1_2048_SHA256: {nil, 2048},
	kmspb.CryptoKeyVersion_RSA_SIGN_PKCS1_3072_SHA256: {nil, 3072},
	kmspb.CryptoKeyVersion_RSA_SIGN_PKCS1_4096_SHA256: {nil, 4096},
}

// CreateCryptoKey makes an asymmetric-sign key and its version 1.
func (g *Google) CreateCryptoKey(_ context.Context, req *kmspb.CreateCryptoKeyRequest) (*kmspb.CryptoKey, error) {
	if err := g.check(); err != nil {
		return nil, err
	}
	ck := req.GetCryptoKey()
	if ck.GetPurpose() != kmspb.CryptoKey_ASYMMETRIC_SIGN {
		return nil, status.Error(codes.InvalidArgument, "the fake makes ASYMMETRIC_SIGN keys only")
	}
	if _, ok := googleAlgs[ck.GetVersionTemplate().GetAlgorithm()]; !ok {
		return nil, status.Errorf(codes.InvalidArgument, "algorithm %v not supported by the fake", ck.GetVersionTemplate().GetAlgorithm())
	}
	name := req.GetParent() + "/cryptoKeys/" + req.GetCryptoKeyId()
	g.gmu.Lock()
	ring, exists := g.rings[req.GetParent()], g.cryptoKs[name] != nil
	if ring && !exists {
		g.cryptoKs[name] = &kmspb.CryptoKey{Name: name, Purpose: ck.GetPurpose(), VersionTemplate: ck.GetVersionTemplate()}
	}
	g.gmu.Unlock()
	switch {
	case !ring:
		return nil, status.Errorf(codes.NotFound, "key ring %s not found", req.GetParent())
	case exists:
		return nil, status.Errorf(codes.AlreadyExists, "crypto key %s exists", name)
	}
	if _, err := g.newVersion(name); err != nil {
		return nil, err
	}
	return g.cryptoKs[name], nil
}

// CreateCryptoKeyVersion adds a version to a crypto key.
func (g *Google) CreateCryptoKeyVersion(_ context.Context, req *kmspb.CreateCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	if err := g.check(); err != nil {
		return nil, err
	}
	return g.newVersion(req.GetParent())
}

func (g *Google) newVersion(cryptoKey string) (*kmspb.CryptoKeyVersion, error) {
	g.gmu.Lock()
	ck := g.cryptoKs[cryptoKey]
	if ck == nil {
		g.gmu.Unlock()
		return nil, status.Errorf(codes.NotFound, "crypto key %s not found", cryptoKey)
	}
	g.versions[cryptoKey]++
	name := cryptoKey + "/cryptoKeyVersions/" + strconv.Itoa(g.versions[cryptoKey])
	g.gmu.Unlock()
	alg := ck.GetVersionTemplate().GetAlgorithm()
	k, err := newKey(googleAlgs[alg].curve, googleAlgs[alg].bits)
	if err == nil {
		err = g.add(name, k)
	}
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &kmspb.CryptoKeyVersion{Name: name, State: kmspb.CryptoKeyVersion_ENABLED, Algorithm: alg,
		ProtectionLevel: ck.GetVersionTemplate().GetProtectionLevel()}, nil
}

// version returns a key version's key and algorithm.
func (g *Google) version(name string) (crypto.Signer, kmspb.CryptoKeyVersion_CryptoKeyVersionAlgorithm, error) {
	k, err := g.get(name)
	if err != nil {
		return nil, 0, status.Error(codes.NotFound, err.Error())
	}
	g.gmu.Lock()
	defer g.gmu.Unlock()
	ck := g.cryptoKs[name[:strings.LastIndex(name, "/cryptoKeyVersions/")]]
	return k, ck.GetVersionTemplate().GetAlgorithm(), nil
}

// GetCryptoKeyVersion describes a key version.
func (g *Google) GetCryptoKeyVersion(_ context.Context, req *kmspb.GetCryptoKeyVersionRequest) (*kmspb.CryptoKeyVersion, error) {
	if err := g.check(); err != nil {
		return nil, err
	}
	_, alg, err := g.version(req.GetName())
	if err != nil {
		return nil, err
	}
	return &kmspb.CryptoKeyVersion{Name: req.GetName(), State: kmspb.CryptoKeyVersion_ENABLED, Algorithm: alg}, nil
}

// GetPublicKey returns a key version's public key in PEM.
func (g *Google) GetPublicKey(_ context.Context, req *kmspb.GetPublicKeyRequest) (*kmspb.PublicKey, error) {
	if err := g.check(); err != nil {
		return nil, err
	}
	k, alg, err := g.version(req.GetName())
	if err != nil {
		return nil, err
	}
	der, err := publicDER(k)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &kmspb.PublicKey{Name: req.GetName(), Algorithm: alg, Pem: string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))}, nil
}

// AsymmetricSign signs a digest with a key version.
func (g *Google) AsymmetricSign(_ context.Context, req *kmspb.AsymmetricSignRequest) (*kmspb.AsymmetricSignResponse, error) {
	if err := g.check(); err != nil {
		return nil, err
	}
	k, _, err := g.version(req.GetName())
	if err != nil {
		return nil, err
	}
	var (
		digest []byte
		hash   crypto.Hash
	)
	switch d := req.GetDigest(); {
	case d.GetSha256() != nil:
		digest, hash = d.GetSha256(), crypto.SHA256
	case d.GetSha384() != nil:
		digest, hash = d.GetSha384(), crypto.SHA384
	case d.GetSha512() != nil:
		digest, hash = d.GetSha512(), crypto.SHA512
	default:
		return nil, status.Error(codes.InvalidArgument, "the fake signs digests only")
	}
	sig, err := g.signDigest(k, digest, hash, false)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	return &kmspb.AsymmetricSignResponse{Name: req.GetName(), Signature: sig}, nil
}
