package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "castellan.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestLoadConfig(t *testing.T) {
	tests := []struct {
		name    string
		file    string // YAML; "" means no --config
		args    []string
		wantErr string // substring naming the key; "" means success
		check   func(t *testing.T, c Config)
	}{
		{
			name: "defaults run without any file",
			check: func(t *testing.T, c Config) {
				if c.TrustDomain != "cluster.local" || c.Listen != ":15012" || c.MonitoringListen != ":15014" || c.Signer != "selfsigned" {
					t.Errorf("defaults = %+v", c)
				}
				if c.ServingDNSNames[0] != "istiod.istio-system.svc" {
					t.Errorf("serving names %v must start with istiod.istio-system.svc", c.ServingDNSNames)
				}
				if c.DefaultTTL != 24*time.Hour || c.MaxTTL != 90*24*time.Hour || c.TTLPolicy != "refuse" {
					t.Errorf("ttl defaults = %s %s %s", c.DefaultTTL, c.MaxTTL, c.TTLPolicy)
				}
			},
		},
		{
			name: "file values apply",
			file: "trustDomain: example.org\nmaxTTL: 48h\nttlPolicy: clamp\nservingDNSNames: [ca.example.org]\n",
			check: func(t *testing.T, c Config) {
				if c.TrustDomain != "example.org" || c.MaxTTL != 48*time.Hour || c.TTLPolicy != "clamp" || c.ServingDNSNames[0] != "ca.example.org" {
					t.Errorf("got %+v", c)
				}
			},
		},
		{
			name: "flags override the file",
			file: "trustDomain: example.org\nlisten: 127.0.0.1:1\n",
			args: []string{"--trust-domain", "flag.example", "--serving-dns-names", "a.example, b.example"},
			check: func(t *testing.T, c Config) {
				if c.TrustDomain != "flag.example" || c.Listen != "127.0.0.1:1" {
					t.Errorf("got %+v", c)
				}
				if strings.Join(c.ServingDNSNames, ",") != "a.example,b.example" {
					t.Errorf("serving names = %v", c.ServingDNSNames)
				}
			},
		},
		{name: "empty file means defaults", file: "\n", check: func(t *testing.T, c Config) {
			if c.TrustDomain != "cluster.local" {
				t.Errorf("got %q", c.TrustDomain)
			}
		}},
		{name: "unknown key fails naming it", file: "trustDomian: x\n", wantErr: "trustDomian"},
		{name: "wrong type fails", file: "maxInFlight: lots\n", wantErr: "lots"},
		{name: "invalid trust domain", args: []string{"--trust-domain", "Not Valid"}, wantErr: "trustDomain"},
		{name: "unknown signer", args: []string{"--signer", "hsm"}, wantErr: "signer"},
		{name: "intermediate needs a directory", args: []string{"--signer", "intermediate"}, wantErr: "cacertsDir"},
		{name: "bad ttl policy", file: "ttlPolicy: sometimes\n", wantErr: "ttlPolicy"},
		{name: "default above max", args: []string{"--default-ttl", "100h", "--max-ttl", "10h"}, wantErr: "defaultTTL"},
		{name: "negative duration", args: []string{"--audit-timeout", "-1s"}, wantErr: "auditTimeout"},
		{name: "bad listen address", args: []string{"--listen", "15012"}, wantErr: "listen"},
		{name: "bad root key type", args: []string{"--root-key-type", "dsa"}, wantErr: "rootKeyType"},
		{name: "bad log level", args: []string{"--log-level", "loud"}, wantErr: "logLevel"},
		{name: "further KEK files from the file", file: "caKEKFiles: [/etc/castellan/kek/next, /etc/castellan/kek-b/kek]\n",
			check: func(t *testing.T, c Config) {
				if strings.Join(c.CAKEKFiles, ",") != "/etc/castellan/kek/next,/etc/castellan/kek-b/kek" {
					t.Errorf("caKEKFiles = %v", c.CAKEKFiles)
				}
			}},
		{name: "further KEK files by flag", args: []string{"--ca-kek-files", "/k/a, /k/b"}, check: func(t *testing.T, c Config) {
			if strings.Join(c.CAKEKFiles, ",") != "/k/a,/k/b" {
				t.Errorf("caKEKFiles = %v", c.CAKEKFiles)
			}
		}},
		{name: "further KEK file inside dataDir", args: []string{"--data-dir", "/var/lib/castellan", "--ca-kek-files", "/k/a,/var/lib/castellan/kek"},
			wantErr: "caKEKFiles[1]: must not be inside dataDir"},
		{name: "key provider", args: []string{"--key-provider", "pkcs11:module-path=/m.so;token=castellan?pin-source=/run/pin"}, check: func(t *testing.T, c Config) {
			if c.KeyProvider != "pkcs11:module-path=/m.so;token=castellan?pin-source=/run/pin" {
				t.Errorf("keyProvider = %q", c.KeyProvider)
			}
		}},
		{name: "key provider with a PIN in it", file: "keyProvider: pkcs11:module-path=/m.so;token=t?pin-value=1234\n", wantErr: "keyProvider: key provider URI: pin-value is not accepted"},
		{name: "key provider of a remote signer", args: []string{"--signer", "vault", "--key-provider", "awskms:region=eu-west-1"}, wantErr: "keyProvider: holds the keys of the selfsigned and intermediate"},
		{name: "cacerts key URI without provider", args: []string{"--signer", "intermediate", "--cacerts-dir", "/x", "--cacerts-key-uri", "pkcs11:object=ca"}, wantErr: "cacertsKeyURI: needs keyProvider"},
		{name: "cacerts key URI with selfsigned", args: []string{"--key-provider", "awskms:", "--cacerts-key-uri", "awskms:key-id=1"}, wantErr: "cacertsKeyURI: only the intermediate"},
		{name: "unknown flag", args: []string{"--no-such-flag"}, wantErr: "no-such-flag"},
		{name: "stray argument", args: []string{"extra"}, wantErr: "unexpected arguments"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			if tt.file != "" {
				args = append([]string{"--config", writeConfig(t, tt.file)}, args...)
			}
			c, err := loadConfig(args)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want one mentioning %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("loadConfig: %v", err)
			}
			tt.check(t, c)
		})
	}
}

func TestConfigPathForms(t *testing.T) {
	for _, args := range [][]string{{"--config", "f.yaml"}, {"-config", "f.yaml"}, {"--config=f.yaml"}, {"--listen", ":1", "-config=f.yaml"}} {
		if got := configPath(args); got != "f.yaml" {
			t.Errorf("configPath(%v) = %q", args, got)
		}
	}
	if got := configPath([]string{"--listen", ":1"}); got != "" {
		t.Errorf("configPath without --config = %q", got)
	}
}
