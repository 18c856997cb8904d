package postgres

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/storage/castoretest"
	"github.com/castellan-ca/castellan/storage/postgres/pgtest"
)

func TestCAStoreConformance(t *testing.T) {
	castoretest.Run(t, func(t *testing.T) castoretest.Store {
		return openStore(t, pgtest.DSN(t), Options{Writer: "ca"}).CAStore()
	})
}

// TestCAStoreShared: two stores (two replicas) on one database see one state.
func TestCAStoreShared(t *testing.T) {
	dsn := pgtest.DSN(t)
	a, b := openStore(t, dsn, Options{Writer: "a"}).CAStore(), openStore(t, dsn, Options{Writer: "b"}).CAStore()
	ctx := context.Background()
	if err := a.Save(ctx, 0, nil); err != nil {
		t.Fatal(err)
	}
	if err := b.Save(ctx, 0, nil); err == nil {
		t.Errorf("the second replica's first save did not conflict")
	}
	at := time.Date(2031, 1, 1, 0, 0, 0, 0, time.UTC)
	if err := b.RaiseDependents(ctx, "k", at); err != nil {
		t.Fatal(err)
	}
	st, err := a.Load(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Version != 1 || !st.Dependents["k"].Equal(at) {
		t.Errorf("replica a sees version %d, dependents %v", st.Version, st.Dependents)
	}
}

// leaderLog records which leader runs, for TestLeader.
type leaderLog struct {
	mu      sync.Mutex
	running map[string]bool
	overlap bool
	starts  []string
}

func (l *leaderLog) fn(name string) func(ctx context.Context) {
	return func(ctx context.Context) {
		l.mu.Lock()
		for other, on := range l.running {
			if on && other != name {
				l.overlap = true
			}
		}
		l.running[name] = true
		l.starts = append(l.starts, name)
		l.mu.Unlock()
		<-ctx.Done()
		l.mu.Lock()
		l.running[name] = false
		l.mu.Unlock()
	}
}

func (l *leaderLog) leader() (string, int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	n, who := 0, ""
	for name, on := range l.running {
		if on {
			n++
			who = name
		}
	}
	return who, n
}

// waitLeader polls until exactly one leader runs, other than not.
func (l *leaderLog) waitLeader(t *testing.T, not string) string {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if who, n := l.leader(); n == 1 && who != not {
			return who
		}
		time.Sleep(20 * time.Millisecond)
	}
	who, n := l.leader()
	t.Fatalf("no single new leader: %d running (%q)", n, who)
	return ""
}

// TestLeader: of three processes one leads; when it stops or its database
// session is killed, another takes over.
func TestLeader(t *testing.T) {
	dsn := pgtest.DSN(t)
	log := &leaderLog{running: map[string]bool{}}
	cancels := map[string]context.CancelFunc{}
	var wg sync.WaitGroup
	for i := range 3 {
		name := fmt.Sprintf("r%d", i)
		ctx, cancel := context.WithCancel(context.Background())
		cancels[name] = cancel
		l := &Leader{Store: openStore(t, dsn, Options{Writer: name}), Interval: 100 * time.Millisecond}
		wg.Add(1)
		go func() { defer wg.Done(); _ = l.Run(ctx, log.fn(name)) }()
	}
	t.Cleanup(func() {
		for _, c := range cancels {
			c()
		}
		wg.Wait()
	})

	first := log.waitLeader(t, "")
	cancels[first]() // a clean stop hands over
	second := log.waitLeader(t, first)

	// A lost session: the server ends it, the others see the lock free.
	if err := (rawDB{dsn}).Exec(context.Background(),
		`SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = $1`,
		uint32(LeaderLock&0xffffffff)); err != nil {
		t.Fatal(err)
	}
	third := log.waitLeader(t, second)
	if third == first {
		t.Errorf("the stopped replica %s leads again", first)
	}
	log.mu.Lock()
	defer log.mu.Unlock()
	t.Logf("leaders in turn: %v (overlap seen: %v)", log.starts, log.overlap)
}
