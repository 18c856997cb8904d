package main

import (
	"bytes"
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/cmd/internal/servetest"
	"github.com/castellan-ca/castellan/storage"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
	"github.com/jackc/pgx/v5"
)

// scheduleLine is what the leader logs when it starts running the schedule.
const scheduleLine = "CA rotation schedule running on this replica"

// TestReplicasFollowTheLeader runs two castellan processes on one PostgreSQL
// database. An operator prepares a root on one; the leader's schedule
// activates it after the propagation window and retires the old root once its
// certificates expire; the other replica follows each step within seconds.
// When the leader stops, the survivor takes over the schedule. CA keys in the
// database are ciphertext under the KEK.
func TestReplicasFollowTheLeader(t *testing.T) {
	dsn := pgtest.DSN(t)
	kek := testKEKFile(t)
	args := []string{"--audit-dsn", dsn, "--ca-kek-file", kek, "--intermediate-lifetime", "2h",
		"--rotation-propagation-window", "4s", "--ca-state-poll-interval", "200ms", "--clock-skew", "1s"}
	dataA, dataB := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	a := startServer(t, dataA, args...)
	b := startServer(t, dataB, args...)
	const id = "spiffe://cluster.local/ns/replica/sa/app"
	const follow = 15 * time.Second // bound on "within seconds", generous for a loaded machine

	sa, sb := caStatusOf(t, dataA), caStatusOf(t, dataB)
	if sa.issuing() == "" || sa.issuing() != sb.issuing() || mustCtl(t, dataA, "bundle") != mustCtl(t, dataB, "bundle") {
		t.Fatalf("the replicas do not share one CA: %s vs %s", sa.issuing(), sb.issuing())
	}
	oldRoot := sa.ids("root", "active")[0]
	oldLeaf := issue(t, dataB, id, "--ttl", "3s")

	out := mustCtl(t, dataA, "ca", "rotate", "prepare")
	newRoot := caStatusOf(t, dataA).ids("root", "prepared")
	if len(newRoot) != 1 {
		t.Fatalf("prepare: %s", out)
	}
	eventually(t, follow, "replica b trusts the prepared root", func() error {
		if n := len(servetest.ParseCerts(t, []byte(mustCtl(t, dataB, "bundle")))); n != 2 {
			return fmt.Errorf("b's bundle holds %d roots", n)
		}
		return nil
	})
	eventually(t, follow+4*time.Second, "the schedule activates the new root; b issues under it", func() error {
		// Short-lived: those issued under the old root delay its retirement.
		f := issue(t, dataB, id, "--ttl", "3s")
		if got := fmt.Sprintf("%x", f.chain[1].AuthorityKeyId); got != newRoot[0] {
			return fmt.Errorf("b issues under root %s", got)
		}
		return nil
	})
	eventually(t, follow+4*time.Second, "the schedule retires the old root on both replicas", func() error {
		for _, data := range []string{dataA, dataB} {
			roots := servetest.ParseCerts(t, []byte(mustCtl(t, data, "bundle")))
			if len(roots) != 1 || fmt.Sprintf("%x", roots[0].SubjectKeyId) != newRoot[0] {
				return fmt.Errorf("%s: bundle holds %d roots", filepath.Base(data), len(roots))
			}
		}
		return nil
	})
	if time.Now().Before(oldLeaf.leaf().NotAfter) {
		t.Errorf("the old root was retired before its last certificate expired (%s)", oldLeaf.leaf().NotAfter)
	}

	// Each scheduled step was taken once, by one leader.
	steps := map[string]int{}
	for _, r := range auditRecords(t, dataB) {
		if r.Kind == storage.KindOperator && r.Caller == "castellan (schedule)" && r.Outcome == storage.OutcomeOK {
			steps[strings.Join(strings.Fields(r.Detail)[:4], " ")]++
		}
	}
	if steps["ca rotate activate root:"] != 1 || steps["ca rotate retire root:"] != 1 {
		t.Errorf("scheduled steps %v, want one activation and one retirement", steps)
	}
	leader, survivor, survivorData := a, b, dataB
	if strings.Contains(b.logs.String(), scheduleLine) {
		leader, survivor, survivorData = b, a, dataA
	}
	if strings.Contains(survivor.logs.String(), scheduleLine) {
		t.Fatalf("both replicas ran the schedule at once")
	}
	if err := oldRootGone(dsn, oldRoot); err != nil {
		t.Error(err)
	}
	if err := keysSealed(dsn, servetest.ReadFile(t, kek)); err != nil {
		t.Error(err)
	}

	// The leader stops; the survivor takes the schedule over.
	if err := leader.stop(); err != nil {
		t.Fatal(err)
	}
	mustCtl(t, survivorData, "ca", "rotate", "prepare", "--target", "intermediate")
	next := caStatusOf(t, survivorData).ids("intermediate", "prepared")
	eventually(t, follow+4*time.Second, "the survivor's schedule activates the intermediate", func() error {
		f := issue(t, survivorData, id, "--ttl", "1h")
		if got := fmt.Sprintf("%x", f.chain[1].SubjectKeyId); len(next) != 1 || got != next[0] {
			return fmt.Errorf("issuing with %s, want %v", got, next)
		}
		return nil
	})
	if !strings.Contains(survivor.logs.String(), scheduleLine) {
		t.Errorf("the survivor never ran the schedule")
	}
}

func withDB(dsn string, fn func(ctx context.Context, conn *pgx.Conn) error) error {
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return fn(ctx, conn)
}

// oldRootGone checks that the retired root's key was erased from the database.
func oldRootGone(dsn, keyID string) error {
	return withDB(dsn, func(ctx context.Context, conn *pgx.Conn) error {
		var phase string
		var key []byte
		if err := conn.QueryRow(ctx, `SELECT phase, sealed_key FROM ca_authority WHERE key_id = $1`, keyID).Scan(&phase, &key); err != nil {
			return err
		}
		if phase != storage.PhaseRetired || key != nil {
			return fmt.Errorf("old root: phase %s, %d key bytes stored", phase, len(key))
		}
		return nil
	})
}

// keysSealed checks every stored key is AES-GCM ciphertext and the KEK is
// nowhere in the database's CA tables.
func keysSealed(dsn string, kek []byte) error {
	return withDB(dsn, func(ctx context.Context, conn *pgx.Conn) error {
		rows, err := conn.Query(ctx, `SELECT key_id, sealed_key FROM ca_authority WHERE sealed_key IS NOT NULL`)
		if err != nil {
			return err
		}
		defer rows.Close()
		n := 0
		for rows.Next() {
			var id string
			var key []byte
			if err := rows.Scan(&id, &key); err != nil {
				return err
			}
			n++
			if key[0] != 1 || bytes.Contains(key, kek) {
				return fmt.Errorf("CA %s: stored key is not sealed under the KEK", id)
			}
		}
		if n == 0 {
			return fmt.Errorf("no keys stored")
		}
		return rows.Err()
	})
}
