// Package datadir is the one definition of what `castellan serve` keeps in its
// data directory and how castellanctl finds the server and its operator
// credential there.
package datadir

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// Paths inside a data directory.
const (
	AuditDB = "audit.db" // embedded audit store
	// AuditCheckpointKey signs audit prune checkpoints and export heads (Ed25519, 0600).
	AuditCheckpointKey = "audit-checkpoint-key.pem"
	// AuditCheckpointPublicKey is its public half (PEM "PUBLIC KEY", 0644),
	// what an auditor verifies an export with.
	AuditCheckpointPublicKey = "audit-checkpoint-key.pub.pem"
	SelfSignedDir            = "ca"             // CA state; the active root's certificate as ca-cert.pem
	CAState                  = "state.json"     // in SelfSignedDir: CA rotation state, keys sealed (0600)
	RootCert                 = "root-cert.pem"  // current trust bundle, rewritten on every change
	ServerInfo               = "server.json"    // where the server listens, for castellanctl
	OperatorDir              = "operator"       // castellanctl's client credential
	OperatorCert             = "cert-chain.pem" // in OperatorDir
	OperatorKey              = "key.pem"        // in OperatorDir, 0600
)

// Default returns the per-user state directory: $XDG_STATE_HOME/castellan or ~/.local/state/castellan.
func Default() string {
	if d := os.Getenv("XDG_STATE_HOME"); d != "" {
		return filepath.Join(d, "castellan")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "state", "castellan")
	}
	return "castellan-data"
}

// Server is the content of server.json.
type Server struct {
	// Address is host:port to dial.
	Address string `json:"address"`
	// ServerName is the DNS name to verify in the serving certificate.
	ServerName string `json:"serverName"`
	// TrustDomain is the CA's trust domain.
	TrustDomain string `json:"trustDomain"`
}

// ReadServer loads server.json from dir.
func ReadServer(dir string) (Server, error) {
	var s Server
	b, err := os.ReadFile(filepath.Join(dir, ServerInfo))
	if err != nil {
		return s, fmt.Errorf("read server info (is `castellan serve` running with --data-dir %s?): %w", dir, err)
	}
	if err := json.Unmarshal(b, &s); err != nil {
		return s, fmt.Errorf("parse %s: %w", filepath.Join(dir, ServerInfo), err)
	}
	return s, nil
}
