package cakey

import (
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"

	"go.step.sm/crypto/kms/apiv1"
	"go.step.sm/crypto/kms/uri"
)

// Provider kinds: the schemes of provider URIs and of the key URIs they hold.
const (
	// PKCS11 is any HSM (or SoftHSM2) reached through its PKCS#11 module.
	PKCS11 = "pkcs11"
	// AWSKMS is AWS Key Management Service.
	AWSKMS = "awskms"
	// CloudKMS is Google Cloud Key Management Service.
	CloudKMS = "cloudkms"
)

// Kinds lists the provider kinds, for messages and documentation.
var Kinds = []string{PKCS11, AWSKMS, CloudKMS}

// providerParams are the attributes each kind's provider URI may carry.
// Anything else is refused, so a typo fails at start-up instead of being
// ignored by the library.
var providerParams = map[string][]string{
	PKCS11:   {"module-path", "token", "serial", "slot-id", "max-sessions", "pin-source"},
	AWSKMS:   {"region", "profile", "credentials-file"},
	CloudKMS: {"key-ring", "credentials-file", "protection-level"},
}

// keyPrefix starts the names of keys created in a cloud KMS; PKCS#11
// objects are labelled with the bare key id, since some HSMs allow labels
// of 32 characters only.
const keyPrefix = "castellan-"

// config is a parsed, validated provider URI.
type config struct {
	kind string
	// library is the URI handed to go.step.sm/crypto/kms: the provider URI
	// without pin-source, whose file Castellan reads itself.
	library string
	// pinFile holds the PKCS#11 user PIN.
	pinFile string
	// keyRing is where Google Cloud KMS keys are created.
	keyRing string
	// protection is the Google Cloud KMS protection level of new keys.
	protection apiv1.ProtectionLevel
	// credentialsFile is the Google service account key file, if any.
	credentialsFile string
}

// CheckURI reports whether s is a valid provider URI, without reaching the
// provider (configuration validation).
func CheckURI(s string) error {
	_, err := parseProviderURI(s)
	return err
}

func parseProviderURI(s string) (*config, error) {
	u, err := uri.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("key provider URI: %w", err)
	}
	kind := strings.ToLower(u.Scheme)
	allowed, ok := providerParams[kind]
	if !ok {
		return nil, fmt.Errorf("key provider URI: unknown scheme %q (want one of %s)", u.Scheme, strings.Join(Kinds, ", "))
	}
	values := uri.Values(u)
	for name := range values {
		switch {
		case name == "pin-value" || name == "pin-prompt":
			// A PIN in the configuration ends up in backups, process lists and
			// support bundles; a prompt cannot be answered by a server.
			return nil, fmt.Errorf("key provider URI: %s is not accepted: put the PIN in a file (a mounted Secret) and name it with pin-source", name)
		case !slices.Contains(allowed, name):
			return nil, fmt.Errorf("key provider URI: unknown attribute %q for %s (want %s)", name, kind, strings.Join(allowed, ", "))
		}
	}
	c := &config{kind: kind, library: s}
	switch kind {
	case PKCS11:
		c.pinFile = u.Get("pin-source")
		if c.pinFile == "" {
			return nil, errors.New("key provider URI: pkcs11 needs pin-source=<file holding the user PIN>: CA keys are private token objects")
		}
		n := 0
		for _, sel := range []string{"token", "serial", "slot-id"} {
			if u.Get(sel) != "" {
				n++
			}
		}
		if n != 1 {
			return nil, errors.New("key provider URI: pkcs11 needs exactly one of token=<label>, serial=<serial> or slot-id=<number>")
		}
		delete(values, "pin-source")
		c.library = uri.New(PKCS11, values).String()
	case CloudKMS:
		c.keyRing = u.Get("key-ring")
		c.credentialsFile = u.Get("credentials-file")
		switch strings.ToLower(u.Get("protection-level")) {
		case "", "hsm":
			c.protection = apiv1.HSM
		case "software":
			c.protection = apiv1.Software
		default:
			return nil, fmt.Errorf("key provider URI: protection-level %q is not hsm or software", u.Get("protection-level"))
		}
		if c.keyRing != "" && !isKeyRing(c.keyRing) {
			return nil, fmt.Errorf("key provider URI: key-ring %q is not projects/<project>/locations/<location>/keyRings/<ring>", c.keyRing)
		}
	}
	return c, nil
}

// isKeyRing reports whether s is a Cloud KMS key ring resource name.
func isKeyRing(s string) bool {
	p := strings.Split(s, "/")
	return len(p) == 6 && p[0] == "projects" && p[2] == "locations" && p[4] == "keyRings" && p[1] != "" && p[3] != "" && p[5] != ""
}

// keyAttrs are the attributes a key URI may carry, by kind: the key only,
// never where the provider is or how to log in (the provider URI says that).
var keyAttrs = map[string][]string{
	PKCS11: {"id", "object"},
	AWSKMS: {"key-id"},
}

// checkKeyURI validates a key URI of provider kind.
func checkKeyURI(kind, s string) error {
	u, err := uri.Parse(s)
	if err != nil {
		return fmt.Errorf("key URI: %w", err)
	}
	if !strings.EqualFold(u.Scheme, kind) {
		return fmt.Errorf("key URI %q: the key provider is %s, so the key URI must start with \"%s:\"", s, kind, kind)
	}
	if kind == CloudKMS {
		// An opaque resource name: projects/…/cryptoKeys/…/cryptoKeyVersions/N.
		p := strings.Split(u.Opaque, "/")
		if len(p) != 10 || !isKeyRing(strings.Join(p[:6], "/")) || p[6] != "cryptoKeys" || p[8] != "cryptoKeyVersions" || p[7] == "" || p[9] == "" || u.RawQuery != "" {
			return fmt.Errorf("key URI %q: want cloudkms:projects/<p>/locations/<l>/keyRings/<r>/cryptoKeys/<k>/cryptoKeyVersions/<n>", s)
		}
		return nil
	}
	values := uri.Values(u)
	if len(values) == 0 {
		return fmt.Errorf("key URI %q names no key (want %s)", s, strings.Join(keyAttrs[kind], " and/or "))
	}
	for name := range values {
		if !slices.Contains(keyAttrs[kind], name) {
			return fmt.Errorf("key URI %q: attribute %q does not belong in a key URI (want only %s; the key provider URI says where the provider is and how to log in)",
				s, name, strings.Join(keyAttrs[kind], ", "))
		}
	}
	return nil
}

// newKeyName is what a new key with CA key id is called inside provider c.
func (c *config) newKeyName(id []byte) (string, error) {
	h := hex.EncodeToString(id)
	switch c.kind {
	case PKCS11:
		// step's kms needs both: CKA_ID (the id bytes) and CKA_LABEL.
		return "pkcs11:id=" + h + ";object=" + h, nil
	case AWSKMS:
		// Becomes the key's description and "name" tag and its alias
		// alias/castellan-<id>-<first 8 of the AWS key id>.
		return keyPrefix + h, nil
	case CloudKMS:
		if c.keyRing == "" {
			return "", errors.New("cloudkms key provider: key-ring=projects/<p>/locations/<l>/keyRings/<r> is needed to create keys")
		}
		return c.keyRing + "/cryptoKeys/" + keyPrefix + h, nil
	}
	return "", fmt.Errorf("key provider %s cannot create keys", c.kind)
}
