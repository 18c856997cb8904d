package publish

import (
	"cmp"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/castellan-ca/castellan/ca"
	"github.com/castellan-ca/castellan/signer"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// The istiod-tls Secret, in the layout istiod reads from
// ./var/run/secrets/istiod/tls (DESIGN.md §10).
const (
	IstiodSecretName = "istiod-tls" //nolint:gosec // the Secret's name, not a credential
	IstiodNamespace  = "istio-system"
	TLSCertKey       = corev1.TLSCertKey       // leaf, then intermediates
	TLSKeyKey        = corev1.TLSPrivateKeyKey // PKCS#8
	CACertKey        = "ca.crt"                // the trust bundle
	// DefaultIstiodCertTTL is the certificate's lifetime when none is set.
	DefaultIstiodCertTTL = 24 * time.Hour
)

// InternalIssuer issues a certificate for Castellan's own use (ca.Issuer):
// signed by the active CA, result-checked and audited.
type InternalIssuer interface {
	IssueInternal(ctx context.Context, purpose string, tmpl *x509.Certificate, key crypto.Signer, ttl time.Duration) (*signer.Chain, *ca.State, error)
}

// IstiodCert keeps istiod's DNS serving certificate in a kubernetes.io/tls
// Secret: tls.crt (the leaf, then any intermediates), tls.key and ca.crt (the
// trust bundle), issued by the active CA. It is renewed at two thirds of its
// life, whenever the CA state changes (every rotation phase: the new root in
// ca.crt at prepare, the new CA's certificate at activate, the old root out at
// retire), and whenever the Secret stops matching (edited, deleted). On a new
// leader a Secret that is still current is kept, so a failover does not
// reissue. Run it only on the leader (see Election).
//
// The private key is made here, written only to the Secret and never logged.
type IstiodCert struct {
	Client kubernetes.Interface
	Issuer InternalIssuer
	Bundle Bundle
	// Namespace and Name of the Secret (default istio-system/istiod-tls).
	Namespace, Name string
	// DNSNames are the certificate's SANs (IstiodDNSNames gives istiod's).
	DNSNames []string
	// TTL is the certificate's lifetime (default DefaultIstiodCertTTL).
	TTL time.Duration
	// RetryDelay bounds the wait after a failed write (default 5 s, doubling
	// up to a minute).
	RetryDelay time.Duration
	// Now is the clock (default time.Now).
	Now    func() time.Time
	Logger *slog.Logger
}

// IstiodDNSNames are the names istiod is dialled by in namespace ns: the
// Service istiod (and istiod-<revision> for each revision) as
// <name>.<ns>.svc and <name>.<ns>.svc.cluster.local.
func IstiodDNSNames(ns string, revisions []string) []string {
	names := []string{"istiod"}
	for _, r := range revisions {
		if r != "" && r != "default" {
			names = append(names, "istiod-"+r)
		}
	}
	var out []string
	for _, n := range names {
		out = append(out, n+"."+ns+".svc", n+"."+ns+".svc.cluster.local")
	}
	return out
}

// Run keeps the Secret current until ctx ends.
func (c *IstiodCert) Run(ctx context.Context) error {
	logger := cmp.Or(c.Logger, slog.New(slog.DiscardHandler)).With("secret", c.namespace()+"/"+c.name())
	factory := informers.NewSharedInformerFactoryWithOptions(c.Client, 0, informers.WithNamespace(c.namespace()),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", c.name()).String()
		}))
	secrets := factory.Core().V1().Secrets()
	kick := make(chan struct{}, 1)
	poke := func(any) {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	if _, err := secrets.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: poke, UpdateFunc: func(_, o any) { poke(o) }, DeleteFunc: poke,
	}); err != nil {
		return err
	}
	factory.Start(ctx.Done())
	defer factory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), secrets.Informer().HasSynced) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("istiod certificate: cache did not sync")
	}
	logger.Info("istiod certificate controller running")
	lister := secrets.Lister().Secrets(c.namespace())
	var written uint64 // CA state generation of the Secret's content; 0: not yet checked this term
	backoff := time.Duration(0)
	for {
		changed := c.Bundle.Changed() // armed before reading the state
		wait, gen, err := c.reconcile(ctx, lister.Get, written, logger)
		if err != nil {
			backoff = min(max(2*backoff, cmp.Or(c.RetryDelay, 5*time.Second)), time.Minute)
			wait = backoff
			if ctx.Err() == nil {
				logger.Warn("istiod certificate not written; retrying", "error", err, "retry_in", wait)
			}
		} else {
			backoff, written = 0, gen
		}
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil
		case <-changed:
		case <-kick:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// reconcile checks the Secret against the current CA state and reissues it
// when it is missing, no longer matches, is due for renewal, or was written
// under an earlier state (written is the generation this term last wrote or
// accepted). It returns how long the Secret stays current and the generation
// it now matches.
func (c *IstiodCert) reconcile(ctx context.Context, get func(string) (*corev1.Secret, error), written uint64, logger *slog.Logger) (time.Duration, uint64, error) {
	st := c.Bundle.Current()
	if st == nil {
		return 0, 0, errors.New("no trust bundle yet")
	}
	now := c.now()
	sec, err := get(c.name())
	if apierrors.IsNotFound(err) {
		sec = nil // typed clients return an empty object with the error
	} else if err != nil {
		return 0, 0, err
	}
	if sec != nil && sec.Type != corev1.SecretTypeTLS {
		return 0, 0, fmt.Errorf("secret %s/%s has type %q, not %q: delete it and Castellan writes it", c.namespace(), c.name(), sec.Type, corev1.SecretTypeTLS)
	}
	if sec != nil && (written == 0 || written == st.Generation) {
		if renewAt, cerr := c.current(sec, st, now); cerr == nil {
			return renewAt.Sub(now), st.Generation, nil
		} else if written == 0 {
			logger.Info("istiod certificate is reissued", "reason", cerr.Error())
		}
	}
	renewAt, gen, err := c.issue(ctx, sec, logger)
	if err != nil {
		return 0, 0, err
	}
	return renewAt.Sub(now), gen, nil
}

// current checks that sec holds a certificate for the configured names,
// with its key, chaining to the current bundle, with ca.crt equal to it, and
// returns when it is due for renewal (an error says why it is not current).
func (c *IstiodCert) current(sec *corev1.Secret, st *ca.State, now time.Time) (time.Time, error) {
	if string(sec.Data[CACertKey]) != st.BundlePEM {
		return time.Time{}, errors.New("ca.crt differs from the trust bundle")
	}
	chain, err := signer.ParseCertificatesPEM(sec.Data[TLSCertKey])
	if err != nil {
		return time.Time{}, fmt.Errorf("tls.crt: %w", err)
	}
	leaf := chain[0]
	key, err := parseKey(sec.Data[TLSKeyKey])
	if err != nil {
		return time.Time{}, fmt.Errorf("tls.key: %w", err)
	}
	if pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool }); !ok || !pub.Equal(leaf.PublicKey) {
		return time.Time{}, errors.New("tls.key does not match tls.crt")
	}
	if !sameNames(leaf.DNSNames, c.DNSNames) {
		return time.Time{}, errors.New("DNS names differ from the configured ones")
	}
	inter := x509.NewCertPool()
	for _, i := range chain[1:] {
		inter.AddCert(i)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: st.Pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		return time.Time{}, fmt.Errorf("does not chain to the trust bundle: %w", err)
	}
	renewAt := leaf.NotBefore.Add(leaf.NotAfter.Sub(leaf.NotBefore) * 2 / 3)
	if !now.Before(renewAt) {
		return time.Time{}, errors.New("due for renewal")
	}
	return renewAt, nil
}

// issue makes a new key and certificate and writes the Secret (creating it if
// sec is nil). The issuance is audited by the issuer before it returns.
func (c *IstiodCert) issue(ctx context.Context, sec *corev1.Secret, logger *slog.Logger) (time.Time, uint64, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return time.Time{}, 0, fmt.Errorf("istiod key: %w", err)
	}
	purpose := "istiod serving certificate (secret " + c.namespace() + "/" + c.name() + ")"
	chain, st, err := c.Issuer.IssueInternal(ctx, purpose, ca.ServingTemplate(c.DNSNames), key, cmp.Or(c.TTL, DefaultIstiodCertTTL))
	if err != nil {
		return time.Time{}, 0, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return time.Time{}, 0, fmt.Errorf("istiod key: %w", err)
	}
	data := map[string][]byte{
		TLSCertKey: []byte(signer.EncodePEM(append([]*x509.Certificate{chain.Leaf}, chain.Intermediates...)...)),
		TLSKeyKey:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
		CACertKey:  []byte(st.BundlePEM),
	}
	secrets := c.Client.CoreV1().Secrets(c.namespace())
	if sec == nil {
		_, err = secrets.Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: c.name(), Namespace: c.namespace(), Labels: map[string]string{"app.kubernetes.io/managed-by": FieldManager}},
			Type:       corev1.SecretTypeTLS, Data: data,
		}, metav1.CreateOptions{FieldManager: FieldManager})
	} else {
		sec = sec.DeepCopy()
		if sec.Data == nil {
			sec.Data = map[string][]byte{}
		}
		for k, v := range data {
			sec.Data[k] = v // other keys someone added are kept
		}
		_, err = secrets.Update(ctx, sec, metav1.UpdateOptions{FieldManager: FieldManager})
	}
	if err != nil {
		return time.Time{}, 0, fmt.Errorf("write secret %s/%s: %w", c.namespace(), c.name(), err)
	}
	logger.Info("istiod certificate written", "serial", fmt.Sprintf("%x", chain.Leaf.SerialNumber),
		"not_after", chain.Leaf.NotAfter, "dns_names", chain.Leaf.DNSNames, "generation", st.Generation)
	return chain.Leaf.NotBefore.Add(chain.Leaf.NotAfter.Sub(chain.Leaf.NotBefore) * 2 / 3), st.Generation, nil
}

func (c *IstiodCert) namespace() string { return cmp.Or(c.Namespace, IstiodNamespace) }
func (c *IstiodCert) name() string      { return cmp.Or(c.Name, IstiodSecretName) }

func (c *IstiodCert) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// parseKey reads a PKCS#8 PEM private key.
func parseKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, errors.New("no PKCS#8 PEM private key")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	s, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("not a signing key")
	}
	return s, nil
}

// sameNames compares two name lists as sets.
func sameNames(a, b []string) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.Sort(a)
	slices.Sort(b)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}
