package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/cmd/internal/datadir"
)

// TestOfflineVerification hands an auditor the log the way README says:
// the checkpoint public key (castellanctl audit checkpoint-key, the same as
// the server's audit-checkpoint-key.pub.pem) and an export. The export
// verifies with no server running, prune checkpoints included; an export
// with a record edited, removed or reordered, a checkpoint removed or the
// end cut, a filtered one and the wrong key do not; a later export
// verifies against the earlier one's head.
func TestOfflineVerification(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	s := startServer(t, data)
	for i := range 3 {
		issue(t, data, fmt.Sprintf("spiffe://cluster.local/ns/offline/sa/sa%d", i))
	}
	mustCtl(t, data, "audit", "prune", "--before", "2200-01-01")
	issue(t, data, "spiffe://cluster.local/ns/offline/sa/after-prune")

	dir := t.TempDir()
	key := filepath.Join(dir, "checkpoint.pub.pem")
	pubPEM := mustCtl(t, data, "audit", "checkpoint-key")
	if file, err := os.ReadFile(filepath.Join(data, datadir.AuditCheckpointPublicKey)); err != nil || string(file) != pubPEM {
		t.Fatalf("audit checkpoint-key printed %q; the server's %s holds %q (%v)", pubPEM, datadir.AuditCheckpointPublicKey, file, err)
	}
	if err := os.WriteFile(key, []byte(pubPEM), 0o600); err != nil {
		t.Fatal(err)
	}
	first, second := filepath.Join(dir, "first.jsonl"), filepath.Join(dir, "second.jsonl")
	_, errOut, err := ctl(data, "audit", "export", "--out", first)
	if err != nil || !strings.Contains(errOut, "with 1 prune checkpoint(s) and a head signed") {
		t.Fatalf("audit export: %v\n%s", err, errOut)
	}
	issue(t, data, "spiffe://cluster.local/ns/offline/sa/later")
	mustCtl(t, data, "audit", "export", "--out", second)
	filtered := filepath.Join(dir, "filtered.jsonl")
	mustCtl(t, data, "audit", "export", "--outcome", "issued", "--out", filtered)
	if err := s.stop(); err != nil { // offline from here on
		t.Fatal(err)
	}

	verify := func(args ...string) (string, int) {
		t.Helper()
		out, errOut, err := ctl(data, append([]string{"audit", "verify"}, args...)...)
		var ee exitError
		switch {
		case err == nil:
			return out, 0
		case errors.As(err, &ee):
			return out, ee.code
		}
		t.Fatalf("audit verify %v: %v\n%s", args, err, errOut)
		return "", 0
	}
	if out, code := verify("--file", first, "--checkpoint-key", key); code != 0 ||
		!strings.Contains(out, "export intact:") || !strings.Contains(out, "1 prune checkpoint(s)") {
		t.Fatalf("verify of the export: exit %d: %s", code, out)
	}
	if out, code := verify("--file", second, "--checkpoint-key", key, "--previous", first); code != 0 || !strings.Contains(out, "only grew") {
		t.Fatalf("verify against the previous export: exit %d: %s", code, out)
	}
	if out, code := verify("--file", first, "--checkpoint-key", key, "--previous", second); code != 1 || !strings.Contains(out, "removed since") {
		t.Fatalf("verify of the earlier export against the later head: exit %d: %s; want records removed since", code, out)
	}

	lines := strings.SplitAfter(strings.TrimSuffix(readFile(t, first), "\n"), "\n")
	edited := append([]string(nil), lines...)
	for i, l := range edited {
		if strings.Contains(l, `"outcome":"issued"`) {
			edited[i] = strings.Replace(l, `"outcome":"issued"`, `"outcome":"refused"`, 1)
			break
		}
	}
	for _, tc := range []struct {
		name, content, want string
	}{
		{"edited", strings.Join(edited, ""), "hash mismatch"},
		{"record removed", strings.Join(slices.Delete(slices.Clone(lines), 2, 3), ""), "missing"},
		{"records reordered", strings.Join(swapped(lines, 1, 2), ""), "missing"},
		{"cut", strings.Join(lines[:len(lines)-2], ""), "NOT SIGNED"},
		{"checkpoint removed", strings.Join(lines[1:], ""), "missing"},
	} {
		path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".jsonl")
		if err := os.WriteFile(path, []byte(tc.content), 0o600); err != nil {
			t.Fatal(err)
		}
		if out, code := verify("--file", path, "--checkpoint-key", key); code != 1 || !strings.Contains(out, tc.want) {
			t.Errorf("verify of the %s export: exit %d: %s; want exit 1 saying %q", tc.name, code, out, tc.want)
		}
	}
	// A selection has gaps in its chains (and no head): it cannot be verified.
	if out, code := verify("--file", filtered, "--checkpoint-key", key, "--allow-unsigned"); code != 1 || !strings.Contains(out, "missing") {
		t.Errorf("verify of a filtered export: exit %d: %s", code, out)
	}
	if out, code := verify("--file", filepath.Join(dir, "cut.jsonl"), "--checkpoint-key", key, "--allow-unsigned"); code != 0 ||
		!strings.Contains(out, "NOT SIGNED") {
		t.Errorf("verify --allow-unsigned of a cut export: exit %d: %s", code, out)
	}
	otherData := filepath.Join(t.TempDir(), "other")
	if err := startServer(t, otherData).stop(); err != nil {
		t.Fatal(err)
	}
	if out, code := verify("--file", first, "--checkpoint-key", filepath.Join(otherData, datadir.AuditCheckpointPublicKey)); code != 1 ||
		!strings.Contains(out, "not by the checkpoint key") {
		t.Errorf("verify with another server's key: exit %d: %s", code, out)
	}
	if _, _, err := ctl(data, "audit", "verify", "--file", first); err == nil || !strings.Contains(err.Error(), "--checkpoint-key") {
		t.Errorf("verify --file without a key = %v; want it to ask for --checkpoint-key", err)
	}
}

func readFile(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// swapped returns a copy of l with elements i and j swapped.
func swapped(l []string, i, j int) []string {
	c := slices.Clone(l)
	c[i], c[j] = c[j], c[i]
	return c
}
