package publish

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Election timings: client-go's usual ones. With ReleaseOnCancel a leader
// that stops cleanly hands over within RetryPeriod; a crashed one within
// LeaseDuration.
const (
	leaseDuration = 15 * time.Second
	renewDeadline = 10 * time.Second
	retryPeriod   = 2 * time.Second
)

// Election runs work on one replica at a time, elected on a Lease.
type Election struct {
	Client kubernetes.Interface
	// Namespace and Name of the Lease.
	Namespace, Name string
	// Identity of this replica in the Lease (unique per process).
	Identity string
	Logger   *slog.Logger
}

// Run calls fn with a context that ends when this replica stops being the
// leader, and stands for election again afterwards, until ctx ends. fn must
// return once its context ends; the next term starts only after it has.
func (e *Election) Run(ctx context.Context, fn func(context.Context)) error {
	logger := e.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	logger = logger.With("lease", e.Namespace+"/"+e.Name, "identity", e.Identity)
	if e.Identity == "" {
		return errors.New("leader election: identity is required")
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: e.Namespace, Name: e.Name},
		Client:     e.Client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: e.Identity},
	}
	for ctx.Err() == nil {
		// The callback only hands over the term's context: fn runs here, so the
		// next term cannot start before this one's fn has returned.
		leading := make(chan context.Context, 1)
		le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            lock,
			LeaseDuration:   leaseDuration,
			RenewDeadline:   renewDeadline,
			RetryPeriod:     retryPeriod,
			ReleaseOnCancel: true,
			Name:            e.Name,
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: func(ctx context.Context) { leading <- ctx },
				OnStoppedLeading: func() {},
				OnNewLeader: func(id string) {
					if id != e.Identity {
						logger.Info("leader election: following", "leader", id)
					}
				},
			},
		})
		if err != nil {
			return fmt.Errorf("leader election: %w", err)
		}
		runDone := make(chan struct{})
		go func() {
			defer close(runDone)
			le.Run(ctx) // acquire (or wait for ctx), then renew until that fails or ctx ends
		}()
		select {
		case term := <-leading:
			logger.Info("leader election: started leading")
			fn(term) //nolint:contextcheck // term is derived from ctx: le.Run(ctx) makes it with context.WithCancel(ctx) and hands it over through the leading channel, which the linter cannot follow
			<-runDone
			logger.Info("leader election: stopped leading")
		case <-runDone:
		}
	}
	return nil
}
