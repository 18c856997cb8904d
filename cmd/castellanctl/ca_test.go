package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/servetest"
	"github.com/castellan-ca/castellan/storage"
)

// caStatus is `ca status --output json`.
type caStatus struct {
	Backend string `json:"backend"`
	Version uint64 `json:"version"`
	CAs     []struct {
		KeyID           string    `json:"key_id"`
		RootKeyID       string    `json:"root_key_id"`
		Role            string    `json:"role"`
		Phase           string    `json:"phase"`
		Issuing         bool      `json:"issuing"`
		NotAfter        time.Time `json:"not_after"`
		DependentsUntil time.Time `json:"dependents_until"`
		NextStepAt      time.Time `json:"next_step_at"`
	} `json:"cas"`
}

func caStatusOf(t *testing.T, data string) caStatus {
	t.Helper()
	var st caStatus
	if err := json.Unmarshal([]byte(mustCtl(t, data, "ca", "status", "--output", "json")), &st); err != nil {
		t.Fatalf("ca status --output json: %v", err)
	}
	return st
}

// ids returns the key ids of the CAs of role in phase.
func (s caStatus) ids(role, phase string) []string {
	var out []string
	for _, c := range s.CAs {
		if c.Role == role && c.Phase == phase {
			out = append(out, c.KeyID)
		}
	}
	return out
}

func (s caStatus) issuing() string {
	for _, c := range s.CAs {
		if c.Issuing {
			return c.KeyID
		}
	}
	return ""
}

// wantCtlRefused runs castellanctl and requires a FailedPrecondition naming want.
func wantCtlRefused(t *testing.T, data, want string, args ...string) {
	t.Helper()
	_, _, err := ctl(data, args...)
	if err == nil || !strings.Contains(err.Error(), "FailedPrecondition") || !strings.Contains(err.Error(), want) {
		t.Errorf("castellanctl %s: %v, want FailedPrecondition saying %q", strings.Join(args, " "), err, want)
	}
}

// testKEKFile writes a key-encryption key outside any data directory.
func testKEKFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "kek")
	if err := os.WriteFile(p, bytes.Repeat([]byte{0x5a}, 32), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestCARotateCLI drives a rotation of the root and of the intermediate
// through castellanctl against the real server: status, each refused step,
// the steps themselves, a forced one, and their audit records.
func TestCARotateCLI(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	const window = 3 * time.Second
	startServer(t, data, "--intermediate-lifetime", "2h", "--rotation-propagation-window", window.String(),
		"--rotation-schedule=false", "--ca-state-poll-interval", "200ms", "--clock-skew", "1s")
	const id = "spiffe://cluster.local/ns/rotate/sa/app"

	st := caStatusOf(t, data)
	oldRoot, oldInter := st.ids("root", "active"), st.ids("intermediate", "active")
	if st.Backend != "selfsigned" || len(oldRoot) != 1 || len(oldInter) != 1 || st.issuing() != oldInter[0] {
		t.Fatalf("initial status: %+v", st)
	}
	table := mustCtl(t, data, "ca", "status")
	for _, want := range []string{"KEY ID", oldRoot[0], "active (issuing)", "schedule off"} {
		if !strings.Contains(table, want) {
			t.Errorf("ca status table lacks %q:\n%s", want, table)
		}
	}
	before := issue(t, data, id, "--ttl", "4s")

	wantCtlRefused(t, data, "no root is prepared", "ca", "rotate", "activate")
	wantCtlRefused(t, data, "no previous root", "ca", "rotate", "retire")
	out := mustCtl(t, data, "ca", "rotate", "prepare")
	if !strings.Contains(out, "prepared root") {
		t.Errorf("prepare printed %q", out)
	}
	st = caStatusOf(t, data)
	newRoot := st.ids("root", "prepared")
	if len(newRoot) != 1 || st.issuing() != oldInter[0] {
		t.Fatalf("after prepare: %+v", st)
	}
	if roots := servetest.ParseCerts(t, []byte(mustCtl(t, data, "bundle"))); len(roots) != 2 {
		t.Errorf("bundle after prepare holds %d roots, want 2", len(roots))
	}
	wantCtlRefused(t, data, "propagation window", "ca", "rotate", "activate")

	// The status says when activation is allowed; once that instant has
	// passed (server and test share the clock), it must be.
	var allowedAt time.Time
	for _, c := range st.CAs {
		if c.KeyID == newRoot[0] {
			allowedAt = c.NextStepAt
		}
	}
	if allowedAt.IsZero() {
		t.Fatalf("the prepared root %s has no next step in the status", newRoot[0])
	}
	time.Sleep(time.Until(allowedAt.Add(10 * time.Millisecond))) // the server's clock is at µs precision
	if _, errOut, err := ctl(data, "ca", "rotate", "activate"); err != nil {
		t.Fatalf("activate after %s, when the status allowed it: %v %s", allowedAt, err, errOut)
	}
	st = caStatusOf(t, data)
	if got := st.ids("root", "active"); len(got) != 1 || got[0] != newRoot[0] {
		t.Errorf("active root %v after activate, want %v", got, newRoot)
	}
	after := issue(t, data, id, "--ttl", "1h")
	if after.chain[1].Equal(before.chain[1]) {
		t.Errorf("issuance did not move to the new intermediate")
	}
	wantCtlRefused(t, data, "has certificates chaining to it", "ca", "rotate", "retire")

	// Forced retirement of the intermediate generation under the old root
	// is audited as forced; its certificate stops verifying.
	out = mustCtl(t, data, "ca", "rotate", "retire", "--force")
	if !strings.Contains(out, "forced past") {
		t.Errorf("forced retire printed %q", out)
	}
	roots := servetest.ParseCerts(t, []byte(mustCtl(t, data, "bundle")))
	if len(roots) != 1 || verifyChain(before.chain, roots) == nil || verifyChain(after.chain, roots) != nil {
		t.Errorf("after a forced retire: %d roots; the old leaf must fail and the new pass", len(roots))
	}

	// The intermediate under the same root: no bundle change.
	mustCtl(t, data, "ca", "rotate", "prepare", "--target", "intermediate")
	wantCtlRefused(t, data, "propagation window", "ca", "rotate", "activate", "--target", "intermediate")
	mustCtl(t, data, "ca", "rotate", "activate", "--target", "intermediate", "--force")
	if got := servetest.ParseCerts(t, []byte(mustCtl(t, data, "bundle"))); len(got) != 1 || !got[0].Equal(roots[0]) {
		t.Errorf("an intermediate rotation changed the bundle")
	}

	var rotation []storage.Record
	for _, r := range auditRecords(t, data) {
		if r.Kind == storage.KindOperator && strings.HasPrefix(r.Detail, "ca rotate") {
			rotation = append(rotation, r)
		}
	}
	want := []struct{ outcome, reason, detail string }{
		{"refused", "ca.rotate.refused", "ca rotate activate root: refused"},
		{"refused", "ca.rotate.refused", "ca rotate retire root: refused"},
		{"ok", "ca.rotate", "ca rotate prepare root:"},
		{"refused", "ca.rotate.refused", "ca rotate activate root: refused"},
	}
	for i, w := range want {
		if i >= len(rotation) || rotation[i].Outcome != w.outcome || rotation[i].Reason != w.reason || !strings.HasPrefix(rotation[i].Detail, w.detail) {
			t.Fatalf("rotation record %d: %+v, want %+v", i, rotation[min(i, len(rotation)-1)], w)
		}
	}
	var forced int
	for _, r := range rotation {
		if r.Reason == "ca.rotate.forced" {
			forced++
			if r.Caller != "spiffe://cluster.local/castellan/operator" || r.AuthMethod != "operator" || !strings.Contains(r.Detail, "--force") {
				t.Errorf("forced record: %+v", r)
			}
		}
	}
	if forced != 2 {
		t.Errorf("%d forced records, want 2 (retire, intermediate activate)", forced)
	}
	var ee exitError
	if _, _, err := ctl(data, "ca", "rotate", "rollback"); err == nil || errors.As(err, &ee) {
		t.Errorf("an unknown step: %v", err)
	}
}

// TestCACertsOldRootLeaves: when the cacerts files move to a chain under a
// new root, the old root stays in the bundle while certificates issued under
// it live, then leaves by itself (audited); it can be forced out earlier.
func TestCACertsOldRootLeaves(t *testing.T) {
	rootA, rootB := newCA(t, "Root A", nil), newCA(t, "Root B", nil)
	a1, b1 := newCA(t, "Intermediate A1", rootA), newCA(t, "Intermediate B1", rootB)
	base := t.TempDir()
	writeCACerts(t, filepath.Join(base, "gen1"), rootA, a1, nil)
	writeCACerts(t, filepath.Join(base, "gen2"), rootB, b1, nil)
	cacerts := filepath.Join(base, "cacerts")
	if err := os.Symlink("gen1", cacerts); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(t.TempDir(), "data")
	startServer(t, data, "--signer", "intermediate", "--cacerts-dir", cacerts, "--cacerts-poll-interval", "200ms",
		"--ca-state-poll-interval", "200ms", "--clock-skew", "1s")
	const id = "spiffe://cluster.local/ns/cacerts/sa/app"
	wantCtlRefused(t, data, "comes from its files", "ca", "rotate", "prepare")
	old := issue(t, data, id, "--ttl", "3s")

	swapLink(t, cacerts, "gen2")
	eventually(t, 20*time.Second, "issuance moves to B1", func() error {
		// Short-lived: those still issued under A1 keep root A in the bundle.
		if f := issue(t, data, id, "--ttl", "3s"); !f.chain[1].Equal(b1.cert) {
			return errors.New("still issuing under A1")
		}
		return nil
	})
	roots := servetest.ParseCerts(t, []byte(mustCtl(t, data, "bundle")))
	if len(roots) != 2 || !containsCert(roots, rootA.cert) {
		t.Errorf("bundle right after the change: %d roots, want B and A", len(roots))
	}
	if err := verifyChain(old.chain, roots); err != nil {
		t.Errorf("A1's certificate no longer verifies: %v", err)
	}
	eventually(t, 30*time.Second, "root A leaves once its certificates expired", func() error {
		roots := servetest.ParseCerts(t, []byte(mustCtl(t, data, "bundle")))
		if len(roots) != 1 || !roots[0].Equal(rootB.cert) {
			return fmt.Errorf("bundle holds %d roots", len(roots))
		}
		return nil
	})
	if time.Now().Before(old.leaf().NotAfter) {
		t.Errorf("root A left before A1's certificate expired at %s", old.leaf().NotAfter)
	}
	if _, ok := findRecord(auditRecords(t, data), func(r storage.Record) bool {
		return r.Caller == "castellan (schedule)" && strings.HasPrefix(r.Detail, "ca rotate retire root") &&
			strings.Contains(r.Detail, fmt.Sprintf("%x", rootA.cert.SubjectKeyId))
	}); !ok {
		t.Errorf("no audit record of root A's retirement")
	}
	st := caStatusOf(t, data)
	if got := st.ids("root", "retired"); len(got) != 1 || got[0] != fmt.Sprintf("%x", rootA.cert.SubjectKeyId) {
		t.Errorf("retired roots %v, want A", got)
	}
}
