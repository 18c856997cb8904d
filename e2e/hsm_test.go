package e2e

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"istio.io/istio/security/pkg/nodeagent/caclient/providers/citadel"
	"istio.io/istio/security/pkg/pki/util"
)

// SoftHSM2 test token of one castellan serve process.
const (
	softHSMModule    = "/usr/lib/softhsm/libsofthsm2.so"
	softHSMModuleEnv = "CASTELLAN_TEST_SOFTHSM_MODULE" // set by the Makefile
	softHSMLabel     = "castellan"
	softHSMPIN       = "1234"
)

// softHSM is a SoftHSM2 token in a directory of its own, for one server.
type softHSM struct {
	conf     string // SOFTHSM2_CONF of the server
	tokenDir string // the token's own directory: its objects, one file each
	away     string // where remove puts the token
	pinFile  string
	uri      string // the key provider URI
}

// newSoftHSM initialises a token; without SoftHSM2 the test is skipped, or
// fails when CI is set.
func newSoftHSM(t *testing.T) *softHSM {
	t.Helper()
	module := softHSMModule
	if m := os.Getenv(softHSMModuleEnv); m != "" {
		module = m
	}
	_, errModule := os.Stat(module)
	_, errUtil := exec.LookPath("softhsm2-util")
	if errModule != nil || errUtil != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("SoftHSM2 missing (apt-get install softhsm2): %v %v", errModule, errUtil)
		}
		t.Skipf("SoftHSM2 missing (apt-get install softhsm2): %v %v", errModule, errUtil)
	}
	dir := t.TempDir()
	h := &softHSM{conf: filepath.Join(dir, "softhsm2.conf"), away: filepath.Join(dir, "removed"), pinFile: filepath.Join(dir, "pin")}
	tokens := filepath.Join(dir, "tokens")
	if err := os.Mkdir(tokens, 0o700); err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "softhsm2.conf", []byte("directories.tokendir = "+tokens+"\nobjectstore.backend = file\n"), 0o600)
	cmd := exec.Command("softhsm2-util", "--init-token", "--free", "--label", softHSMLabel, "--pin", softHSMPIN, "--so-pin", "5678")
	cmd.Env = append(os.Environ(), "SOFTHSM2_CONF="+h.conf)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("softhsm2-util --init-token: %v\n%s", err, out)
	}
	ents, err := os.ReadDir(tokens)
	if err != nil || len(ents) != 1 {
		t.Fatalf("token directory: %d entries, %v", len(ents), err)
	}
	h.tokenDir = filepath.Join(tokens, ents[0].Name())
	h.setPIN(t, softHSMPIN)
	h.uri = "pkcs11:module-path=" + module + ";token=" + softHSMLabel + "?pin-source=" + h.pinFile
	return h
}

// configure makes cfg's server keep its CA keys in the token.
func (h *softHSM) configure(cfg *serverConfig) {
	cfg.env = append(cfg.env, "SOFTHSM2_CONF="+h.conf)
	cfg.extraArgs = append(cfg.extraArgs, "--key-provider", h.uri)
}

func (h *softHSM) setPIN(t *testing.T, pin string) {
	t.Helper()
	writeFile(t, filepath.Dir(h.pinFile), filepath.Base(h.pinFile), []byte(pin+"\n"), 0o600)
}

// objects counts the token's key objects (a key pair is two; token.object
// is the token's own record).
func (h *softHSM) objects(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir(h.tokenDir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".object") && e.Name() != "token.object" {
			n++
		}
	}
	return n
}

// remove takes the token out, as if unplugged; restore puts it back.
func (h *softHSM) remove(t *testing.T) {
	t.Helper()
	if err := os.Rename(h.tokenDir, h.away); err != nil {
		t.Fatal(err)
	}
}

func (h *softHSM) restore(t *testing.T) {
	t.Helper()
	if err := os.Rename(h.away, h.tokenDir); err != nil {
		t.Fatal(err)
	}
}

// TestHSM runs the server with its root and intermediate keys in a SoftHSM2
// token: a full rotation creates new keys in the token and leaves no CA
// private key in the data directory or the CA state; the token's removal
// and a wrong PIN make issuance Unavailable (audited, /readyz failing)
// until the token and the PIN are back, with no restart.
func TestHSM(t *testing.T) {
	hsm := newSoftHSM(t)
	cfg := serverConfig{signer: "selfsigned", extraArgs: []string{"--intermediate-lifetime", "1h", "--rotation-schedule=false",
		"--rotation-propagation-window", "1s", "--ca-state-poll-interval", "200ms"}}
	hsm.configure(&cfg)
	srv := startServer(t, cfg)
	if got := hsm.objects(t); got != 4 {
		t.Errorf("token holds %d objects after the first start, want 4 (root and intermediate key pairs)", got)
	}
	credDir := t.TempDir()
	wantIssued(t, srv, operatorIssue(t, srv, credDir))

	var cred credential // issued under the new root, for the outage steps
	t.Run("rotation", func(t *testing.T) {
		before := hsm.objects(t)
		srv.ctl(t, "ca", "rotate", "prepare")
		if got := hsm.objects(t) - before; got != 4 {
			t.Errorf("prepare added %d token objects, want 4 (new root and intermediate key pairs)", got)
		}
		srv.ctl(t, "ca", "rotate", "activate", "--force")
		srv.ctl(t, "ca", "rotate", "retire", "--force")
		st := rotStatus(t, srv)
		if st.only(t, "root", "retired").KeyID == st.only(t, "root", "active").KeyID {
			t.Fatal("the active root is the retired one")
		}
		state := readCAState(t, srv)
		var certs []*x509.Certificate
		for _, c := range state.CAs {
			cert, err := x509.ParseCertificate(c.Cert)
			if err != nil {
				t.Fatal(err)
			}
			certs = append(certs, cert)
			if want := "pkcs11:id=" + c.KeyID + ";object=" + c.KeyID; c.Phase != "retired" && (len(c.SealedKey) == 0 || c.SealedKey[0] != 3 || string(c.SealedKey[1:]) != want) {
				t.Errorf("%s %s (%s): stored key %q, want only its URI %s behind format byte 3", c.Role, c.KeyID, c.Phase, c.SealedKey, want)
			}
		}
		if found := caPrivateKeys(t, srv.dataDir, certs); len(found) > 0 {
			t.Errorf("CA private keys in the data directory: %v", found)
		}
		cred = operatorIssue(t, srv, credDir)
		wantIssued(t, srv, cred)
	})

	t.Run("token removed", func(t *testing.T) {
		hsm.remove(t)
		wantUnavailable(t, srv, cred)
		wantNotReady(t, srv, "key provider pkcs11")
	})

	t.Run("wrong PIN", func(t *testing.T) {
		hsm.setPIN(t, "0000")
		hsm.restore(t)
		wantNotReady(t, srv, "refused the PIN")
		wantUnavailable(t, srv, cred)
	})

	t.Run("recovered", func(t *testing.T) {
		hsm.setPIN(t, softHSMPIN)
		deadline := time.Now().Add(30 * time.Second)
		for code, _ := readyz(t, srv); code != http.StatusOK; code, _ = readyz(t, srv) {
			if time.Now().After(deadline) {
				t.Fatal("/readyz not 200 within 30s of the PIN's correction")
			}
			time.Sleep(pollInterval)
		}
		wantIssued(t, srv, cred)
	})
}

// wantIssued renews a workload certificate with Istio's client and checks
// that it chains to the current trust bundle.
func wantIssued(t *testing.T, srv *server, cred credential) {
	t.Helper()
	chain, err := hsmCSR(t, srv, cred)
	if err != nil {
		t.Fatalf("CSRSign: %v", err)
	}
	certs, err := parseCerts(concatCerts(chain))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	for _, r := range readCerts(t, filepath.Join(srv.dataDir, "root-cert.pem")) {
		roots.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("issued certificate does not verify to the trust bundle: %v", err)
	}
}

// wantUnavailable checks that a renewal fails with Unavailable and that the
// failure is audited as the signer's outage.
func wantUnavailable(t *testing.T, srv *server, cred credential) {
	t.Helper()
	n := len(srv.auditList(t))
	_, err := hsmCSR(t, srv, cred)
	if code := grpcCode(errOrNil(err)); code != "Unavailable" {
		t.Fatalf("CSRSign with the key provider down: err = %v, want code Unavailable", err)
	}
	recs := csrRecords(srv.auditList(t)[n:])
	if len(recs) == 0 {
		t.Fatal("no audit record of the refused request")
	}
	for _, r := range recs {
		checkFields(t, "audit record", []field{{"outcome", r.Outcome, "failed"}, {"code", r.Code, "Unavailable"}, {"reason", r.Reason, "signer.unavailable"}})
	}
}

// errOrNil turns a nil error into one without a code, for grpcCode.
func errOrNil(err error) error {
	if err == nil {
		return io.EOF
	}
	return err
}

// operatorIssue gets a workload credential with castellanctl issue, into
// dir (which must outlive the subtests that use the credential).
func operatorIssue(t *testing.T, srv *server, dir string) credential {
	t.Helper()
	srv.ctl(t, "issue", "--identity", workloadID, "--out-dir", dir, "--ttl", leafTTL.String())
	return credential{keyFile: filepath.Join(dir, "key.pem"), chainFile: filepath.Join(dir, "cert-chain.pem")}
}

// hsmCSR renews cred with Istio's client over mTLS, as a VM's pilot-agent does.
func hsmCSR(t *testing.T, srv *server, cred credential) ([]string, error) {
	t.Helper()
	client := newClient(t, srv, &citadel.TLSOptions{RootCert: filepath.Join(srv.dataDir, "root-cert.pem"), Key: cred.keyFile, Cert: cred.chainFile})
	csrPEM, _, err := util.GenCSR(util.CertOptions{Host: workloadID, ECSigAlg: util.EcdsaSigAlg, ECCCurve: util.P256Curve})
	if err != nil {
		t.Fatal(err)
	}
	return csrSign(t, client, csrPEM)
}

// readyz returns /readyz's status and body.
func readyz(t *testing.T, srv *server) (int, string) {
	t.Helper()
	resp, err := (&http.Client{Timeout: httpTimeout * 3}).Get("http://" + srv.monAddr + "/readyz")
	if err != nil {
		t.Fatalf("GET /readyz: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(body)
}

// wantNotReady waits until /readyz fails saying want (the provider is
// retried every few seconds, so the reason may take that long to show).
func wantNotReady(t *testing.T, srv *server, want string) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, body := readyz(t, srv)
		if code == http.StatusServiceUnavailable && strings.Contains(body, want) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz = %d %q, want 503 saying %q", code, body, want)
		}
		time.Sleep(pollInterval)
	}
}

// caState is what the test reads of DIR/ca/state.json.
type caState struct {
	CAs []struct {
		KeyID     string `json:"keyId"`
		Role      string `json:"role"`
		Phase     string `json:"phase"`
		Cert      []byte `json:"cert"`
		SealedKey []byte `json:"sealedKey"`
	} `json:"cas"`
}

func readCAState(t *testing.T, srv *server) caState {
	t.Helper()
	var st caState
	if err := json.Unmarshal(mustRead(t, filepath.Join(srv.dataDir, "ca", "state.json")), &st); err != nil {
		t.Fatal(err)
	}
	if len(st.CAs) == 0 {
		t.Fatal("CA state lists no CA")
	}
	return st
}

// base64Run finds runs of standard base64 long enough to hold a key.
var base64Run = regexp.MustCompile(`[A-Za-z0-9+/]{64,}={0,2}`)

// caPrivateKeys scans every file under dir for private keys, as PEM blocks,
// as DER anywhere in a file, and as DER inside base64 (the JSON CA state),
// and names those that are the key of one of cas.
func caPrivateKeys(t *testing.T, dir string, cas []*x509.Certificate) []string {
	t.Helper()
	var found []string
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		blobs := [][]byte{data}
		for _, run := range base64Run.FindAll(data, -1) {
			if b, err := base64.StdEncoding.DecodeString(string(run)); err == nil {
				blobs = append(blobs, b)
			}
		}
		for _, b := range blobs {
			for _, key := range privateKeysIn(b) {
				for _, c := range cas {
					if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); ok && pub.Equal(c.PublicKey) {
						found = append(found, path+": key of CA "+hex.EncodeToString(c.SubjectKeyId))
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// privateKeysIn returns the private keys in b: PEM blocks and DER
// structures (PKCS#8, SEC 1, PKCS#1) at any offset.
func privateKeysIn(b []byte) []crypto.Signer {
	var keys []crypto.Signer
	for rest := b; ; {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			break
		}
		keys = append(keys, privateKeysIn(block.Bytes)...)
	}
	for i := 0; i < len(b); i++ {
		if b[i] != 0x30 {
			continue
		}
		n, ok := derLen(b[i:])
		if !ok {
			continue
		}
		der := b[i : i+n]
		var k any
		var err error
		if k, err = x509.ParsePKCS8PrivateKey(der); err != nil {
			if k, err = x509.ParseECPrivateKey(der); err != nil {
				k, err = x509.ParsePKCS1PrivateKey(der)
			}
		}
		if s, ok := k.(crypto.Signer); ok && err == nil {
			keys = append(keys, s)
			i += n - 1 // a PKCS#8 key holds its SEC 1 form: count it once
		}
	}
	return keys
}

// derLen returns the length of the DER element at the start of b.
func derLen(b []byte) (int, bool) {
	if len(b) < 2 {
		return 0, false
	}
	l, hdr := int(b[1]), 2
	if l&0x80 != 0 {
		n := l & 0x7f
		if n == 0 || n > 3 || len(b) < 2+n {
			return 0, false
		}
		l = 0
		for _, x := range b[2 : 2+n] {
			l = l<<8 | int(x)
		}
		hdr += n
	}
	if hdr+l > len(b) {
		return 0, false
	}
	return hdr + l, true
}

// TestCAKeyScan shows the scan finds a CA key where a software key would
// be: PKCS#8 DER in the base64 of the JSON state, and a PEM file.
func TestCAKeyScan(t *testing.T) {
	ca := newTestCA(t)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(ca.intermediateKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	state, err := json.Marshal(map[string]any{"cas": []map[string]any{{"sealedKey": append([]byte{0}, der...)}}})
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, dir, "state.json", state, 0o600)
	other, _ := x509.MarshalPKCS8PrivateKey(key)
	writeFile(t, dir, "other.pem", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: other}), 0o600)
	found := caPrivateKeys(t, dir, []*x509.Certificate{ca.root, ca.intermediate})
	if len(found) != 1 || !strings.Contains(found[0], "state.json") {
		t.Errorf("scan found %v, want the intermediate's key in state.json only", found)
	}
	if keys := privateKeysIn(mustRead(t, filepath.Join(dir, "other.pem"))); len(keys) != 1 {
		t.Errorf("the scan found %d keys in a PEM file of one key, want 1", len(keys))
	}
}
