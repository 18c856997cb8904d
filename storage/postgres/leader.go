package postgres

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/jackc/pgx/v5"
)

// LeaderLock is the pg_try_advisory_lock key of the CA rotation leader
// ("castlead" in ASCII), distinct from the migration lock.
const LeaderLock int64 = 0x636173746c656164

// Leader elects one process among those sharing the database: the holder of
// a session-level advisory lock, taken on a dedicated connection (not the
// pool's) so that the lock lives exactly as long as that session. If the
// session dies the server releases the lock and another process takes it;
// the holder notices by a failed ping and stops leading. Both can lead for
// the moment in between, so the work must stay safe under overlap (CA state
// changes compare-and-swap on the state's version).
type Leader struct {
	Store *Store
	// Key is the advisory lock key; zero means LeaderLock.
	Key int64
	// Interval is how often a follower retries the lock and a leader checks
	// its session (default 2 s).
	Interval time.Duration
	Logger   *slog.Logger
}

// Run calls fn with a context that ends when this process stops leading,
// and campaigns again afterwards, until ctx ends. fn must return once its
// context ends.
func (l *Leader) Run(ctx context.Context, fn func(ctx context.Context)) error {
	interval := l.Interval
	if interval <= 0 {
		interval = 2 * time.Second
	}
	key := l.Key
	if key == 0 {
		key = LeaderLock
	}
	logger := l.logger()
	for ctx.Err() == nil {
		led, err := l.term(ctx, key, interval, fn)
		if err != nil && ctx.Err() == nil {
			logger.Warn("leader election: database session failed; retrying", "error", err)
		}
		if led {
			logger.Info("leader election: stopped leading")
		}
		select {
		case <-ctx.Done():
		case <-time.After(interval):
		}
	}
	return nil
}

// term opens a session, waits to take the lock and runs fn while the
// session stays healthy. led reports whether fn ran.
func (l *Leader) term(ctx context.Context, key int64, interval time.Duration, fn func(context.Context)) (led bool, err error) {
	conn, err := pgx.ConnectConfig(ctx, l.Store.pool.Config().ConnConfig.Copy())
	if err != nil {
		return false, fmt.Errorf("connect: %w", err)
	}
	defer func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), interval)
		defer cancel()
		// Closing the session releases the lock; unlocking first is only courtesy.
		if led {
			_, _ = conn.Exec(cctx, `SELECT pg_advisory_unlock($1)`, key)
		}
		_ = conn.Close(cctx)
	}()
	for {
		var got bool
		if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1)`, key).Scan(&got); err != nil {
			return false, err
		}
		if got {
			break
		}
		select {
		case <-ctx.Done():
			return false, nil
		case <-time.After(interval):
		}
	}
	termCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	done := make(chan struct{})
	go func() {
		defer close(done)
		fn(termCtx)
	}()
	l.logger().Info("leader election: leading")
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-done:
			return true, nil
		case <-t.C:
		}
		pctx, pcancel := context.WithTimeout(ctx, interval)
		err := conn.Ping(pctx)
		pcancel()
		if err != nil {
			cancel()
			<-done
			if ctx.Err() != nil {
				return true, nil
			}
			return true, errors.Join(errors.New("leader session lost"), err)
		}
	}
}

func (l *Leader) logger() *slog.Logger {
	if l.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return l.Logger
}
