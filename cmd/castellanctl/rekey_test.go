package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/ca/rotation"
	"github.com/castellan-ca/castellan/cmd/internal/servetest"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
	"github.com/jackc/pgx/v5"
)

// kekFileOf writes a key-encryption key of 32 copies of b outside any data
// directory and returns its path and id.
func kekFileOf(t *testing.T, b byte) (path, id string) {
	t.Helper()
	kek := bytes.Repeat([]byte{b}, rotation.KEKSize)
	path = filepath.Join(t.TempDir(), "kek")
	if err := os.WriteFile(path, kek, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := rotation.NewSealer(kek)
	if err != nil {
		t.Fatal(err)
	}
	return path, s.ID()
}

// sealedUnder is `ca status --output json`'s list of KEK ids.
func sealedUnderOf(t *testing.T, data string) []string {
	t.Helper()
	var st struct {
		SealedUnder []string `json:"sealed_under_kek_ids"`
	}
	if err := json.Unmarshal([]byte(mustCtl(t, data, "ca", "status", "--output", "json")), &st); err != nil {
		t.Fatal(err)
	}
	return st.SealedUnder
}

// storedKeysOpen checks every CA key in the database: stored in format
// (1: one sealing, 2: several) and opened by each of keks alone.
func storedKeysOpen(dsn string, format byte, keks ...string) error {
	return withDB(dsn, func(ctx context.Context, conn *pgx.Conn) error {
		rows, err := conn.Query(ctx, `SELECT key_id, sealed_key FROM ca_authority WHERE sealed_key IS NOT NULL`)
		if err != nil {
			return err
		}
		keys := map[string][]byte{}
		for rows.Next() {
			var id string
			var key []byte
			if err := rows.Scan(&id, &key); err != nil {
				return err
			}
			keys[id] = key
		}
		if err := rows.Err(); err != nil || len(keys) == 0 {
			return fmt.Errorf("%d keys stored: %w", len(keys), err)
		}
		for id, key := range keys {
			if key[0] != format {
				return fmt.Errorf("CA %s: stored in format %d, want %d", id, key[0], format)
			}
			for _, f := range keks {
				kek, err := rotation.ReadKEKFile(f)
				if err != nil {
					return err
				}
				s, err := rotation.NewSealer(kek)
				if err != nil {
					return err
				}
				if bytes.Contains(key, kek) {
					return fmt.Errorf("CA %s: the stored key contains a KEK", id)
				}
				if _, err := s.Open(id, key); err != nil {
					return fmt.Errorf("CA %s with KEK %s alone: %w", id, s.ID(), err)
				}
			}
		}
		return nil
	})
}

// serveFails runs castellan serve and requires it to exit with an error
// whose log says want.
func serveFails(t *testing.T, dataDir, want string, extra ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), startTimeout)
	defer cancel()
	args := append([]string{"serve", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--monitoring-listen", "127.0.0.1:0"}, extra...)
	out, err := exec.CommandContext(ctx, castellanBinary(t), args...).CombinedOutput()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || ctx.Err() != nil || !strings.Contains(string(out), want) {
		t.Errorf("castellan serve %v: %v, want it to fail saying %q; log:\n%s", extra, err, want, out)
	}
}

// TestKEKRekeyReplicas rotates the key-encryption key of two castellan
// processes on one PostgreSQL database without downtime. Replica a holds
// the new KEK file (caKEKFiles) and runs the rekey; replica b has only the
// old KEK and keeps issuing, also across a restart, until it is given the
// new one; then the rekey is finished and the old KEK opens nothing. Each
// step is audited.
func TestKEKRekeyReplicas(t *testing.T) {
	dsn := pgtest.DSN(t)
	oldKEK, oldID := kekFileOf(t, 0x11)
	newKEK, newID := kekFileOf(t, 0x22)
	common := []string{"--audit-dsn", dsn, "--intermediate-lifetime", "2h", "--ca-state-poll-interval", "200ms"}
	withKEKs := func(kek string, more ...string) []string {
		args := append(slices.Clone(common), "--ca-kek-file", kek)
		if len(more) > 0 {
			args = append(args, "--ca-kek-files", strings.Join(more, ","))
		}
		return args
	}
	dataA, dataB := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	startServer(t, dataA, withKEKs(oldKEK, newKEK)...)
	b := startServer(t, dataB, withKEKs(oldKEK)...)
	const id = "spiffe://cluster.local/ns/rekey/sa/app"
	issuer := caStatusOf(t, dataB).issuing()
	issues := func(data string) {
		t.Helper()
		f := issue(t, data, id, "--ttl", "1h")
		if got := fmt.Sprintf("%x", f.chain[1].SubjectKeyId); got != issuer {
			t.Errorf("%s issues under %s, want %s", filepath.Base(data), got, issuer)
		}
	}
	issues(dataB)
	if got := sealedUnderOf(t, dataA); !slices.Equal(got, []string{oldID}) {
		t.Fatalf("sealed under %v, want [%s]", got, oldID)
	}

	// b may not read the new KEK: its configuration does not name the file.
	wantCtlRefused(t, dataB, "is not one of this replica's key-encryption key files", "ca", "rekey", "--new-kek-file", newKEK)

	out := mustCtl(t, dataA, "ca", "rekey", "--new-kek-file", newKEK)
	if !strings.Contains(out, "CA keys sealed under KEK "+newID+", "+oldID+" (rekey under way") {
		t.Errorf("ca rekey output:\n%s", out)
	}
	if err := storedKeysOpen(dsn, 2, oldKEK, newKEK); err != nil {
		t.Fatal(err)
	}
	for _, data := range []string{dataA, dataB} {
		if got := sealedUnderOf(t, data); !slices.Equal(got, []string{newID, oldID}) {
			t.Errorf("%s reports sealed under %v", filepath.Base(data), got)
		}
	}

	// b, still with the old KEK only, keeps issuing, and restarts with it.
	issues(dataB)
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	b = startServer(t, dataB, withKEKs(oldKEK)...)
	issues(dataB)
	issues(dataA)

	// b is given the new KEK and finishes the rekey.
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	startServer(t, dataB, withKEKs(newKEK)...)
	issues(dataB)
	mustCtl(t, dataB, "ca", "rekey", "--finish")
	if err := storedKeysOpen(dsn, 1, newKEK); err != nil {
		t.Fatal(err)
	}
	if err := keysSealed(dsn, servetest.ReadFile(t, newKEK)); err != nil {
		t.Error(err)
	}
	wantCtlRefused(t, dataA, "no rekey is under way", "ca", "rekey", "--finish")
	issues(dataA) // a runs on, on the keys it holds
	issues(dataB)

	// The old KEK alone opens nothing any more.
	serveFails(t, filepath.Join(t.TempDir(), "c"), "does not open with the configured key-encryption key", withKEKs(oldKEK)...)

	// Both steps and the refusals are in the audit log, by the operator.
	steps := map[string]int{}
	for _, r := range auditRecords(t, dataB) {
		if r.Kind == storage.KindOperator && strings.HasPrefix(r.Reason, "ca.rekey") {
			steps[r.Reason+" "+r.Outcome]++
			if !strings.HasSuffix(r.Caller, "/castellan/operator") {
				t.Errorf("rekey record by %q", r.Caller)
			}
		}
	}
	if steps["ca.rekey ok"] != 1 || steps["ca.rekey.finish ok"] != 1 || steps["ca.rekey.refused refused"] != 2 {
		t.Errorf("rekey audit records %v, want one rekey, one finish and two refusals", steps)
	}
}

// TestCARekeyArguments: exactly one of --new-kek-file and --finish, checked
// before any connection is made.
func TestCARekeyArguments(t *testing.T) {
	data := t.TempDir() // no server: a valid command would fail to dial
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "give either --new-kek-file FILE or --finish"},
		{[]string{"--new-kek-file", "/k", "--finish"}, "give either --new-kek-file FILE or --finish"},
		{[]string{"--finish", "--output", "yaml"}, "--output must be table or json"},
		{[]string{"--finish", "extra"}, "unexpected arguments"},
	} {
		_, _, err := ctl(data, append([]string{"ca", "rekey"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ca rekey %v: %v, want %q", tc.args, err, tc.want)
		}
	}
}
