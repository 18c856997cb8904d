package main

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestRotationConfig(t *testing.T) {
	data := t.TempDir()
	outside := filepath.Join(t.TempDir(), "kek")
	// A path that reaches the data directory through a symbolic link.
	link := filepath.Join(t.TempDir(), "link")
	if err := os.Symlink(data, link); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		file    string
		args    []string
		wantErr string // substring naming the key; "" means success
	}{
		{"defaults", "", nil, ""},
		{"keys in the file", "intermediateLifetime: 720h\nrotationPropagationWindow: 2h\nrotationSchedule: false\n" +
			"rotationScheduleFraction: 0.5\ncaStatePollInterval: 1s\ncaKEKFile: " + outside + "\n", nil, ""},
		{"KEK beside the data", "", []string{"--ca-kek-file", filepath.Join(data, "ca", "kek")}, "caKEKFile: must not be inside dataDir"},
		{"KEK beside the data through a link", "", []string{"--ca-kek-file", filepath.Join(link, "kek")}, "caKEKFile: must not be inside dataDir"},
		{"PostgreSQL without a KEK", "", []string{"--audit-dsn", "postgres://u@h/db"}, "caKEKFile: required with auditDSN"},
		{"PostgreSQL with a KEK", "", []string{"--audit-dsn", "postgres://u@h/db", "--ca-kek-file", outside}, ""},
		{"fraction of 1", "", []string{"--rotation-schedule-fraction", "1"}, "rotationScheduleFraction"},
		{"no propagation window", "", []string{"--rotation-propagation-window", "0s"}, "rotationPropagationWindow: must be positive"},
		{"intermediate outliving the root", "", []string{"--intermediate-lifetime", "87600h"}, "intermediateLifetime"},
		{"poll too often", "", []string{"--ca-state-poll-interval", "1ms"}, "caStatePollInterval"},
		{"web bundle endpoint without files", "", []string{"--bundle-endpoint-listen", ":8443", "--bundle-endpoint-auth", "https_web"}, "bundleEndpointCertFile"},
		{"unknown bundle endpoint auth", "", []string{"--bundle-endpoint-listen", ":8443", "--bundle-endpoint-auth", "http"}, "bundleEndpointAuth"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, ok := loadCase(t, tc.file, append([]string{"--data-dir", data}, tc.args...), tc.wantErr)
			if ok && tc.name == "keys in the file" && (c.IntermediateLifetime != 720*time.Hour || c.PropagationWindow != 2*time.Hour ||
				c.RotationSchedule || c.ScheduleFraction != 0.5 || c.CAStatePoll != time.Second || c.CAKEKFile != outside) {
				t.Errorf("got %+v", c.RotationConfig)
			}
		})
	}
}
