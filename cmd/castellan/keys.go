package main

import (
	"context"
	"flag"
	"log/slog"

	"github.com/castellan-ca/castellan/signer/cakey"
	"github.com/castellan-ca/castellan/signer/intermediate"
	"github.com/castellan-ca/castellan/signer/selfsigned"
)

// KeysConfig says where the CA keys of the local signers live, at the top
// level of the file: in memory (sealed in the CA state) by default, or in an
// HSM or cloud KMS (README, "CA keys in an HSM or a cloud KMS").
type KeysConfig struct {
	KeyProvider   string `yaml:"keyProvider"`
	CACertsKeyURI string `yaml:"cacertsKeyURI"`
}

func bindKeyFlags(fs *flag.FlagSet, c *KeysConfig) {
	fs.StringVar(&c.KeyProvider, "key-provider", c.KeyProvider, "HSM or KMS holding the CA keys: pkcs11:module-path=…;token=…?pin-source=FILE | awskms:region=… | cloudkms:key-ring=projects/…/keyRings/… (empty: software keys)")
	fs.StringVar(&c.CACertsKeyURI, "cacerts-key-uri", c.CACertsKeyURI, "intermediate: URI of the CA key in --key-provider, in place of ca-key.pem / tls.key")
}

// validate checks the key provider keys against the signer.
func (c KeysConfig) validate(bad func(key, format string, a ...any), cfg Config) {
	if c.KeyProvider != "" {
		if err := cakey.CheckURI(c.KeyProvider); err != nil {
			bad("keyProvider", "%v", err)
		}
		if cfg.Signer != selfsigned.Backend && cfg.Signer != intermediate.Backend {
			bad("keyProvider", "holds the keys of the selfsigned and intermediate signers; the %s signer keeps its own", cfg.Signer)
		}
	}
	if c.CACertsKeyURI != "" {
		switch {
		case cfg.Signer != intermediate.Backend:
			bad("cacertsKeyURI", "only the intermediate signer reads its key from cacerts")
		case c.KeyProvider == "":
			bad("cacertsKeyURI", "needs keyProvider: the provider that holds the key")
		}
	}
}

// openKeyProvider connects to the configured key provider; nil when CA keys
// are software keys. A provider that cannot be reached yet is no error: the
// CA then reports Unavailable, and /readyz says why, until it can.
func openKeyProvider(ctx context.Context, cfg Config, logger *slog.Logger) (*cakey.Provider, error) {
	if cfg.KeyProvider == "" {
		return nil, nil
	}
	logger = logger.With("component", "key-provider")
	p, err := cakey.New(ctx, cakey.Config{URI: cfg.KeyProvider, Logger: logger})
	if err != nil {
		return nil, err
	}
	logger.Info("CA keys held by a key provider", "provider", p.Kind())
	return p, nil
}
