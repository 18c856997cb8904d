package storagetest

import (
	"sync"
	"time"

	"github.com/castellan-ca/castellan/storage/groupcommit"
)

// ManualTimers is a timer source for groupcommit.Hooks.NewTimer whose
// timers fire only when the test calls Fire: a batch delay or retry
// interval then never runs out on its own, so tests wait for events, not
// for time.
type ManualTimers struct {
	mu      sync.Mutex
	cond    *sync.Cond // signalled when a timer is made; guarded by mu
	pending []*manualTimer
}

type manualTimer struct {
	c       chan time.Time
	m       *ManualTimers
	stopped bool
}

// NewTimer implements groupcommit.Hooks.NewTimer.
func (m *ManualTimers) NewTimer(time.Duration) groupcommit.Timer {
	t := &manualTimer{c: make(chan time.Time, 1), m: m}
	m.mu.Lock()
	defer m.mu.Unlock()
	live := m.pending[:0]
	for _, p := range m.pending {
		if !p.stopped {
			live = append(live, p)
		}
	}
	live = append(live, t)
	m.pending = live
	if m.cond != nil {
		m.cond.Broadcast()
	}
	return t
}

// Fire fires every timer made and not yet fired or stopped, and returns
// how many it fired.
func (m *ManualTimers) Fire() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, t := range m.pending {
		if !t.stopped {
			t.stopped = true
			t.c <- time.Now()
			n++
		}
	}
	m.pending = nil
	return n
}

// Await blocks until at least n timers are waiting (made, neither fired nor
// stopped), e.g. until the writer waits on its retry interval.
func (m *ManualTimers) Await(n int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.cond == nil {
		m.cond = sync.NewCond(&m.mu)
	}
	for m.waiting() < n {
		m.cond.Wait()
	}
}

func (m *ManualTimers) waiting() int {
	n := 0
	for _, t := range m.pending {
		if !t.stopped {
			n++
		}
	}
	return n
}

func (t *manualTimer) C() <-chan time.Time { return t.c }

func (t *manualTimer) Stop() bool {
	t.m.mu.Lock()
	defer t.m.mu.Unlock()
	was := !t.stopped
	t.stopped = true
	return was
}
