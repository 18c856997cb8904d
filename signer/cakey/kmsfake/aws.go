package kmsfake

import (
	"crypto"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// AWS is an AWS KMS endpoint on 127.0.0.1 (the JSON 1.1 protocol of the
// TrentService: CreateKey, CreateAlias, GetPublicKey, Sign). Point the SDK
// at it with AWS_ENDPOINT_URL_KMS=URL (Env does, with test credentials).
type AWS struct {
	keyring
	// URL is the endpoint, http://127.0.0.1:PORT.
	URL     string
	aliases map[string]string
}

// awsAccount and awsRegion are what the fake's ARNs say.
const (
	awsAccount = "111122223333"
	awsRegion  = "eu-west-1"
)

// NewAWS starts a fake AWS KMS, stopped at the end of the test.
func NewAWS(t testing.TB) *AWS {
	a := &AWS{aliases: map[string]string{}}
	srv := httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(srv.Close)
	a.URL = srv.URL
	return a
}

// Env sets what the AWS SDK needs to use the fake for the rest of the test:
// its endpoint, static test credentials, and no shared files or instance
// metadata. The provider URI then names just the region.
func (a *AWS) Env(t *testing.T) {
	t.Setenv("AWS_ENDPOINT_URL_KMS", a.URL)
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDCASTELLANTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "castellan-test-secret")
	t.Setenv("AWS_REGION", awsRegion)
	t.Setenv("AWS_CONFIG_FILE", "/nonexistent")
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
}

// awsError is the JSON protocol's error body.
type awsError struct {
	status int
	typ    string
	msg    string
}

func (a *AWS) serve(w http.ResponseWriter, r *http.Request) {
	op, ok := strings.CutPrefix(r.Header.Get("X-Amz-Target"), "TrentService.")
	if r.Method != http.MethodPost || !ok {
		http.Error(w, "not a KMS request", http.StatusBadRequest)
		return
	}
	if !strings.HasPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 ") {
		writeAWS(w, nil, &awsError{http.StatusBadRequest, "MissingAuthenticationTokenException", "request is not signed"})
		return
	}
	if a.down.Load() {
		writeAWS(w, nil, &awsError{http.StatusInternalServerError, "KMSInternalException", "the fake is down"})
		return
	}
	var in map[string]any
	if err := json.NewDecoder(r.Body).Decode(&in); err != nil {
		writeAWS(w, nil, &awsError{http.StatusBadRequest, "SerializationException", err.Error()})
		return
	}
	var (
		out any
		ae  *awsError
	)
	switch op {
	case "CreateKey":
		out, ae = a.createKey(in)
	case "CreateAlias":
		out, ae = a.createAlias(in)
	case "GetPublicKey":
		out, ae = a.getPublicKey(in)
	case "Sign":
		out, ae = a.sign(in)
	default:
		ae = &awsError{http.StatusBadRequest, "UnsupportedOperationException", op + " is not implemented by the fake"}
	}
	writeAWS(w, out, ae)
}

func writeAWS(w http.ResponseWriter, out any, ae *awsError) {
	w.Header().Set("Content-Type", "application/x-amz-json-1.1")
	if ae != nil {
		w.Header().Set("X-Amzn-ErrorType", ae.typ)
		w.WriteHeader(ae.status)
		_ = json.NewEncoder(w).Encode(map[string]string{"__type": ae.typ, "message": ae.msg})
		return
	}
	_ = json.NewEncoder(w).Encode(out)
}

// awsSpecs maps KeySpec to the key made.
var awsSpecs = map[string]struct {
	curve elliptic.Curve
	bits  int
	algs  []string
}{
	"ECC_NIST_P256": {elliptic.P256(), 0, []string{"ECDSA_SHA_256"}},
	"ECC_NIST_P384": {elliptic.P384(), 0, []string{"ECDSA_SHA_384"}},
	"RSA_2048":      {nil, 2048, rsaAlgs},
	"RSA_3072":      {nil, 3072, rsaAlgs},
	"RSA_4096":      {nil, 4096, rsaAlgs},
}

var rsaAlgs = []string{"RSASSA_PKCS1_V1_5_SHA_256", "RSASSA_PKCS1_V1_5_SHA_384", "RSASSA_PKCS1_V1_5_SHA_512",
	"RSASSA_PSS_SHA_256", "RSASSA_PSS_SHA_384", "RSASSA_PSS_SHA_512"}

func str(in map[string]any, k string) string { s, _ := in[k].(string); return s }

func (a *AWS) arn(id string) string {
	return "arn:aws:kms:" + awsRegion + ":" + awsAccount + ":key/" + id
}

func (a *AWS) createKey(in map[string]any) (any, *awsError) {
	spec := str(in, "KeySpec")
	s, ok := awsSpecs[spec]
	if !ok || str(in, "KeyUsage") != "SIGN_VERIFY" {
		return nil, &awsError{http.StatusBadRequest, "ValidationException", fmt.Sprintf("KeySpec %q / KeyUsage %q not supported by the fake", spec, str(in, "KeyUsage"))}
	}
	k, err := newKey(s.curve, s.bits)
	if err != nil {
		return nil, &awsError{http.StatusInternalServerError, "KMSInternalException", err.Error()}
	}
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	h := hex.EncodeToString(b)
	id := h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
	if err := a.add(id, k); err != nil {
		return nil, &awsError{http.StatusInternalServerError, "KMSInternalException", err.Error()}
	}
	return map[string]any{"KeyMetadata": map[string]any{
		"KeyId": id, "Arn": a.arn(id), "AWSAccountId": awsAccount, "CreationDate": float64(time.Now().Unix()),
		"Description": str(in, "Description"), "Enabled": true, "KeyState": "Enabled", "KeySpec": spec,
		"KeyUsage": "SIGN_VERIFY", "Origin": "AWS_KMS", "KeyManager": "CUSTOMER", "SigningAlgorithms": s.algs,
	}}, nil
}

func (a *AWS) createAlias(in map[string]any) (any, *awsError) {
	alias, target := str(in, "AliasName"), str(in, "TargetKeyId")
	if !strings.HasPrefix(alias, "alias/") {
		return nil, &awsError{http.StatusBadRequest, "ValidationException", "alias must start with alias/"}
	}
	if _, err := a.get(target); err != nil {
		return nil, &awsError{http.StatusBadRequest, "NotFoundException", err.Error()}
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.aliases[alias]; ok {
		return nil, &awsError{http.StatusBadRequest, "AlreadyExistsException", alias + " already exists"}
	}
	a.aliases[alias] = target
	return map[string]any{}, nil
}

// Aliases returns the aliases made, alias → key id.
func (a *AWS) Aliases() map[string]string {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := map[string]string{}
	for k, v := range a.aliases {
		out[k] = v
	}
	return out
}

// key resolves a KeyId: a key id, its ARN or an alias.
func (a *AWS) key(ref string) (string, crypto.Signer, *awsError) {
	id := strings.TrimPrefix(ref, "arn:aws:kms:"+awsRegion+":"+awsAccount+":key/")
	if strings.HasPrefix(ref, "alias/") {
		a.mu.Lock()
		id = a.aliases[ref]
		a.mu.Unlock()
	}
	k, err := a.get(id)
	if err != nil {
		return "", nil, &awsError{http.StatusBadRequest, "NotFoundException", err.Error()}
	}
	return id, k, nil
}

func (a *AWS) getPublicKey(in map[string]any) (any, *awsError) {
	id, k, ae := a.key(str(in, "KeyId"))
	if ae != nil {
		return nil, ae
	}
	der, err := publicDER(k)
	if err != nil {
		return nil, &awsError{http.StatusInternalServerError, "KMSInternalException", err.Error()}
	}
	return map[string]any{"KeyId": a.arn(id), "PublicKey": der, "KeyUsage": "SIGN_VERIFY"}, nil
}

// awsHashes maps a SigningAlgorithm to its hash and padding.
func awsHash(alg string) (crypto.Hash, bool, error) {
	var h crypto.Hash
	switch {
	case strings.HasSuffix(alg, "_SHA_256"):
		h = crypto.SHA256
	case strings.HasSuffix(alg, "_SHA_384"):
		h = crypto.SHA384
	case strings.HasSuffix(alg, "_SHA_512"):
		h = crypto.SHA512
	default:
		return 0, false, errors.New("unsupported SigningAlgorithm " + alg)
	}
	return h, strings.HasPrefix(alg, "RSASSA_PSS_"), nil
}

func (a *AWS) sign(in map[string]any) (any, *awsError) {
	id, k, ae := a.key(str(in, "KeyId"))
	if ae != nil {
		return nil, ae
	}
	if mt := str(in, "MessageType"); mt != "DIGEST" {
		return nil, &awsError{http.StatusBadRequest, "ValidationException", "the fake signs digests only, not " + mt}
	}
	msg, err := decodeBlob(str(in, "Message"))
	if err != nil {
		return nil, &awsError{http.StatusBadRequest, "SerializationException", err.Error()}
	}
	h, pss, err := awsHash(str(in, "SigningAlgorithm"))
	if err != nil {
		return nil, &awsError{http.StatusBadRequest, "ValidationException", err.Error()}
	}
	sig, err := a.signDigest(k, msg, h, pss)
	if err != nil {
		return nil, &awsError{http.StatusBadRequest, "ValidationException", err.Error()}
	}
	return map[string]any{"KeyId": a.arn(id), "Signature": sig, "SigningAlgorithm": str(in, "SigningAlgorithm")}, nil
}

// decodeBlob decodes a JSON blob (standard base64).
func decodeBlob(s string) ([]byte, error) {
	var b []byte
	err := json.Unmarshal([]byte(`"`+s+`"`), &b)
	return b, err
}
