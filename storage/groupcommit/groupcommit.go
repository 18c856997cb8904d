// Package groupcommit is the group-commit queue of Castellan's audit stores
// (storage/embedded, storage/postgres): callers queue records, one writer
// goroutine per store commits every queued record in one transaction, so
// concurrent callers share the cost of one durable commit. A store supplies
// only its batch write (Config.Commit) and, if a failed commit may still have
// committed, a way to find out (Config.Settle).
//
// # What a caller is told
//
// Append returns nil only after the transaction holding its record has
// committed; the record it was given is then the stored, sealed record. An
// error means the record is absent from the log, or is followed in the log
// by an undelivered marker (storage.Undelivered, reason
// storage.ReasonCommitUnconfirmed), so that no certificate is ever counted
// as delivered when its caller heard "failed":
//
//   - ctx ends before the writer takes the record into a batch: the record is
//     withdrawn and never written; the error wraps ctx.Err().
//   - ctx ends while its batch is being committed: Append returns at once
//     with an error wrapping ctx.Err() and storage.ErrCommitUnconfirmed. If
//     the record commits anyway, the store appends a marker for it, first in
//     its next transaction (the next batch, or after RetryInterval when none
//     comes, or at Close).
//   - the commit fails: every caller of the batch gets the error. If the
//     store cannot rule out that the transaction committed (Config.Settle,
//     e.g. a lost COMMIT acknowledgement), it finds out before its next
//     batch and marks the records that did commit.
//   - the database refuses the batch for a data reason (the error wraps
//     storage.ErrRecordRejected): the records are committed one per
//     transaction, so that only the offender fails; a substitute
//     (storage.Rejected) is stored in its place and its caller gets an error
//     wrapping storage.ErrRecordRejected.
//   - Close: records queued before Close are committed and their callers
//     get the real outcome; Append after Close fails with storage.ErrClosed.
//
// No caller's ctx ever aborts a transaction: a batch is shared by others.
//
// Every record is validated (storage.Record.Validate) and sanitised
// (storage.Record.Sanitize) on the caller's goroutine before it is queued,
// so no caller-controlled string can make the database refuse a batch.
package groupcommit

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/castellan-ca/castellan/storage"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// Config configures a Queue. Commit is required.
type Config struct {
	// Name prefixes errors ("<name>: append: ...") and names the store in logs.
	Name string
	// Writer is the id of the chain the store appends to, for logs.
	Writer string
	// MaxBatch caps the records committed in one transaction (default 256).
	MaxBatch int
	// MaxBatchDelay is how long the writer waits for more records after the
	// first one of a batch. Zero commits whatever is queued at once, which
	// still batches under load because callers queue while a commit runs.
	MaxBatchDelay time.Duration
	// CommitTimeout bounds each Commit and Settle call (0: no bound).
	CommitTimeout time.Duration
	// RetryInterval is how often the writer retries pending undelivered
	// markers (or settling a failed batch) when no append arrives to carry
	// them (default 1 s).
	RetryInterval time.Duration
	// Now dates markers and fills a zero Record.Time; nil means time.Now.
	Now func() time.Time
	// Logger receives operational events; nil discards them.
	Logger *slog.Logger

	// Commit writes b in one transaction: it reads the chain head inside
	// the transaction, calls b.Seal with it and inserts b.Records in order.
	// It returns nil only once the transaction has committed. A refusal
	// for a data reason must wrap storage.ErrRecordRejected.
	Commit func(ctx context.Context, b *Batch) error
	// Settle, when set, is called after a failed Commit, before the next
	// one, and reports whether that failed transaction committed after all.
	// An error leaves the question open: the next batch fails with it and
	// Settle is asked again before the one after.
	Settle func(ctx context.Context) (committed bool, err error)

	// Hooks are test seams; the zero value runs none.
	Hooks Hooks
}

// Hooks are test seams, called where noted; nil fields are skipped.
type Hooks struct {
	// Queued runs on the caller's goroutine once its record is in the queue.
	Queued func()
	// Gathered runs on the writer goroutine each time the batch being
	// gathered grows, with its size so far.
	Gathered func(n int)
	// Claimed runs on the writer goroutine once a batch of callers' records
	// is taken (they can no longer be withdrawn), before it is committed,
	// with their number. It may block to hold the batch.
	Claimed func(n int)
	// Closed runs in Close once the queue accepts no more records, before
	// Close waits for the queued ones to be committed.
	Closed func()
	// NewTimer makes the batch-delay and retry timers; nil means real ones.
	NewTimer func(d time.Duration) Timer
}

// Timer is what the queue needs of a timer (*time.Timer, or a test's).
type Timer interface {
	// C returns the channel the timer fires on.
	C() <-chan time.Time
	// Stop stops the timer.
	Stop() bool
}

type realTimer struct{ t *time.Timer }

func (r realTimer) C() <-chan time.Time { return r.t.C }
func (r realTimer) Stop() bool          { return r.t.Stop() }

// Stats counts the writer's work since the queue started.
type Stats struct {
	Batches     uint64 // committed transactions
	Records     uint64 // committed records, markers and substitutes included
	Failures    uint64 // transactions that failed
	Undelivered uint64 // undelivered markers committed
	Rejected    uint64 // records refused for a data reason, stored as substitutes
}

// States of a request. The caller and the writer race to move it on with a
// compare-and-swap, so exactly one of them decides what the caller is told.
const (
	queued    int32 = iota // in the queue: the caller may withdraw it
	withdrawn              // the caller gave up while queued: never written
	claimed                // in a batch being committed
	abandoned              // the caller gave up while claimed: may commit, then needs a marker
	answered               // the writer sent the outcome on done
)

// request is one queued Append.
type request struct {
	rec   storage.Record  // the store's copy, sanitised: the caller may reuse its record once it gives up
	out   *storage.Record // the caller's record, set to the sealed copy on success
	state atomic.Int32
	done  chan error // receives exactly one outcome when answered
	// rejected, when set, means rec is a substitute for the caller's
	// record, which the database refused: the caller is told this error.
	rejected error
	// batch is how many records the transaction that committed rec held,
	// set by the writer before it answers; 0 until then.
	batch int
}

// Queue is one store's group-commit queue and its writer goroutine. It is
// safe for concurrent use.
type Queue struct {
	cfg Config
	log *slog.Logger

	// mu guards closed and sends on ch: Append sends under RLock, Close
	// takes the write lock before closing ch, so no send races the close.
	mu     sync.RWMutex
	closed bool
	ch     chan *request
	done   chan struct{} // closed when the writer goroutine has exited

	batches, records, failures, undelivered, rejected atomic.Uint64

	// Owned by the writer goroutine.
	batch    []*request
	buf      Batch
	unmarked []storage.Record // committed records whose callers were told "failed": each needs a marker
	doubt    []storage.Record // callers' records of a failed transaction that Settle has not ruled on
	inDoubt  bool
}

// New starts a queue's writer goroutine. The caller must Close the queue.
func New(cfg Config) *Queue {
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 256
	}
	if cfg.MaxBatchDelay < 0 {
		cfg.MaxBatchDelay = 0
	}
	if cfg.RetryInterval <= 0 {
		cfg.RetryInterval = time.Second
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Hooks.NewTimer == nil {
		cfg.Hooks.NewTimer = func(d time.Duration) Timer { return realTimer{time.NewTimer(d)} }
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	q := &Queue{
		cfg: cfg, log: log,
		// A buffer of one batch lets callers queue while a commit is running.
		ch:    make(chan *request, cfg.MaxBatch),
		done:  make(chan struct{}),
		batch: make([]*request, 0, cfg.MaxBatch),
		buf:   Batch{Records: make([]storage.Record, 0, cfg.MaxBatch)},
	}
	go q.run()
	return q
}

// Stats returns counters of the writer's work.
func (q *Queue) Stats() Stats {
	return Stats{Batches: q.batches.Load(), Records: q.records.Load(), Failures: q.failures.Load(),
		Undelivered: q.undelivered.Load(), Rejected: q.rejected.Load()}
}

func (q *Queue) errorf(err error) error { return fmt.Errorf("%s: append: %w", q.cfg.Name, err) }

// Append durably records rec and fills its chain fields (and Time, if zero)
// with the stored values; see the package documentation for what an error
// means. rec is validated and sanitised first; the caller must not touch
// it until Append returns.
func (q *Queue) Append(ctx context.Context, rec *storage.Record) error {
	if err := rec.Validate(); err != nil {
		return q.errorf(err)
	}
	if err := ctx.Err(); err != nil {
		return q.errorf(err)
	}
	req := newRequest(rec)
	if err := q.enqueue(ctx, req); err != nil {
		req.free()
		return err
	}
	if h := q.cfg.Hooks.Queued; h != nil {
		h()
	}
	var err error
	select {
	case err = <-req.done:
	case <-ctx.Done():
		if req.state.CompareAndSwap(queued, withdrawn) {
			return q.errorf(ctx.Err()) // the writer may still hold req: not freed
		}
		if req.state.CompareAndSwap(claimed, abandoned) {
			return q.errorf(fmt.Errorf("%w: %w", storage.ErrCommitUnconfirmed, ctx.Err()))
		}
		err = <-req.done // the writer answered first
	}
	annotate(ctx, req.batch)
	req.free() // answered: the writer's last use of req was the send on done
	return err
}

// AttrBatchRecords is the attribute, on the caller's span (ca's
// castellan.audit.commit), of how many records the transaction that
// committed its record held: one commit serves that many requests.
const AttrBatchRecords = attribute.Key("castellan.audit.batch_records")

// annotate sets AttrBatchRecords on ctx's span when it is recorded.
func annotate(ctx context.Context, batch int) {
	if batch == 0 {
		return
	}
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		span.SetAttributes(AttrBatchRecords.Int(batch))
	}
}

// requests recycles answered requests: a record copy and a channel per
// Append would otherwise be garbage on the hot path.
var requests = sync.Pool{New: func() any { return &request{done: make(chan error, 1)} }}

// newRequest returns a queued request holding a sanitised copy of rec.
func newRequest(rec *storage.Record) *request {
	req := requests.Get().(*request)
	req.rec, req.out = *rec, rec
	req.rec.Sanitize()
	req.rec.Time = req.rec.Time.UTC()
	req.rec.NotBefore, req.rec.NotAfter = utcOrZero(req.rec.NotBefore), utcOrZero(req.rec.NotAfter)
	return req
}

// free returns req to the pool; only for a request the writer no longer
// holds (never queued, or answered and its answer received).
func (r *request) free() {
	r.rec, r.out, r.rejected, r.batch = storage.Record{}, nil, nil, 0
	r.state.Store(queued)
	requests.Put(r)
}

func (q *Queue) enqueue(ctx context.Context, req *request) error {
	q.mu.RLock()
	defer q.mu.RUnlock()
	if q.closed {
		return q.errorf(storage.ErrClosed)
	}
	select {
	case q.ch <- req:
		return nil
	case <-ctx.Done():
		return q.errorf(ctx.Err())
	}
}

// Close stops accepting records, waits until the queued ones are committed
// (their callers get the real outcome) and pending markers had a last
// chance to be written. Calling it again returns at once.
func (q *Queue) Close() {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return
	}
	q.closed = true
	close(q.ch)
	q.mu.Unlock()
	if h := q.cfg.Hooks.Closed; h != nil {
		h()
	}
	<-q.done
}

func utcOrZero(t time.Time) time.Time {
	if t.IsZero() {
		return time.Time{}
	}
	return t.UTC()
}

// pending reports whether the writer has work without a caller: markers to
// write or a failed transaction to settle.
func (q *Queue) pending() bool { return len(q.unmarked) > 0 || q.inDoubt }

// run is the writer goroutine: it takes a batch of queued requests, commits
// them in one transaction and answers each caller. With work pending and
// nothing queued it retries every RetryInterval.
func (q *Queue) run() {
	defer close(q.done)
	for {
		var (
			retry  Timer
			retryC <-chan time.Time
		)
		if q.pending() {
			retry = q.cfg.Hooks.NewTimer(q.cfg.RetryInterval)
			retryC = retry.C()
		}
		var first *request
		ok := true
		select {
		case first, ok = <-q.ch:
		case <-retryC:
		}
		if retry != nil {
			retry.Stop()
		}
		if !ok {
			if q.pending() {
				q.commit(nil) // last chance for the markers
			}
			if q.pending() {
				q.log.Error("audit store closed with undelivered markers unwritten", "store", q.cfg.Name,
					"writer", q.cfg.Writer, "records", seqsOf(q.unmarked), "unsettled", q.inDoubt)
			}
			return
		}
		batch := q.batch[:0]
		if first != nil {
			batch = q.gather(append(batch, first))
		}
		q.commit(batch)
		clear(batch) // drop references to callers' records
	}
}

// gather adds queued requests to batch until it holds MaxBatch, the queue is
// empty (MaxBatchDelay 0) or MaxBatchDelay has passed since the first one.
func (q *Queue) gather(batch []*request) []*request {
	q.gathered(len(batch))
	var timeout <-chan time.Time
	if q.cfg.MaxBatchDelay > 0 {
		t := q.cfg.Hooks.NewTimer(q.cfg.MaxBatchDelay)
		defer t.Stop()
		timeout = t.C()
	}
	for len(batch) < q.cfg.MaxBatch {
		var (
			r  *request
			ok bool
		)
		if timeout == nil {
			select {
			case r, ok = <-q.ch:
			default:
				return batch
			}
		} else {
			select {
			case r, ok = <-q.ch:
			case <-timeout:
				return batch
			}
		}
		if !ok {
			return batch
		}
		batch = append(batch, r)
		q.gathered(len(batch))
	}
	return batch
}

func (q *Queue) gathered(n int) {
	if h := q.cfg.Hooks.Gathered; h != nil {
		h(n)
	}
}

// commit claims the batch's requests that are still wanted and commits
// them with the pending markers, one transaction for all, or one per
// record when the database refuses the batch for a data reason.
func (q *Queue) commit(batch []*request) {
	live := batch[:0]
	for _, r := range batch {
		if r.state.CompareAndSwap(queued, claimed) { // else withdrawn: never written
			live = append(live, r)
		}
	}
	if len(live) == 0 && !q.pending() {
		return
	}
	if h := q.cfg.Hooks.Claimed; h != nil && len(live) > 0 {
		h(len(live))
	}
	err := q.write(live)
	switch {
	case err == nil:
	case errors.Is(err, storage.ErrRecordRejected) && (len(live) > 1 || len(q.unmarked) > 0):
		q.writeEach(live)
	default:
		q.fail(live, err)
	}
}

// writeEach commits the pending markers, then each record, in transactions
// of their own, after the database refused them together for a data
// reason: only the offender's caller fails, and a substitute
// (storage.Rejected) takes the offender's place in the log.
func (q *Queue) writeEach(live []*request) {
	q.log.Warn("audit batch refused for a data reason; committing its records one by one", "store", q.cfg.Name,
		"writer", q.cfg.Writer, "records", len(live), "markers", len(q.unmarked))
	if len(q.unmarked) > 0 {
		err := q.write(nil)
		switch {
		case errors.Is(err, storage.ErrRecordRejected):
			// Markers copy committed records; one refused now can only be
			// refused by a constraint added since. Keeping it would make
			// every later batch fail the same way.
			q.log.Error("undelivered markers refused by the database; dropped", "store", q.cfg.Name,
				"writer", q.cfg.Writer, "records", seqsOf(q.unmarked), "error", err)
			q.unmarked = nil
		case err != nil:
			q.fail(live, err)
			return
		}
	}
	for i, r := range live {
		err := q.write(live[i : i+1])
		if errors.Is(err, storage.ErrRecordRejected) {
			q.log.Error("audit record refused by the database; storing a substitute", "store", q.cfg.Name,
				"writer", q.cfg.Writer, "request_id", r.rec.RequestID, "error", err)
			r.rejected = q.errorf(err)
			r.rec = *storage.Rejected(&r.rec)
			if err = q.write(live[i : i+1]); err == nil {
				q.rejected.Add(1)
				continue
			}
			if errors.Is(err, storage.ErrRecordRejected) {
				q.log.Error("substitute audit record refused too; nothing stored for this request", "store", q.cfg.Name,
					"writer", q.cfg.Writer, "request_id", r.rec.RequestID, "error", err)
				q.fail(live[i:i+1], r.rejected)
				continue
			}
		}
		if err != nil {
			q.fail(live[i:], err)
			return
		}
	}
}

// fail tells every caller of live that has not given up that its record
// was not committed.
func (q *Queue) fail(live []*request, err error) {
	q.log.Error("audit batch failed", "store", q.cfg.Name, "writer", q.cfg.Writer, "records", len(live),
		"markers", len(q.unmarked), "error", err)
	err = q.errorf(err)
	for _, r := range live {
		if r.state.CompareAndSwap(claimed, answered) {
			if r.rejected != nil {
				r.done <- r.rejected
			} else {
				r.done <- err
			}
		}
	}
}

// write settles an earlier failed transaction, then commits the pending
// markers and live's records in one transaction. On success it answers
// live's callers (or queues markers for those who gave up); on failure it
// answers nobody and returns the error.
func (q *Queue) write(live []*request) error {
	ctx, cancel := context.Background(), context.CancelFunc(func() {})
	if q.cfg.CommitTimeout > 0 {
		ctx, cancel = context.WithTimeout(ctx, q.cfg.CommitTimeout)
	}
	defer cancel()
	if err := q.settle(ctx); err != nil {
		return err
	}
	if len(live) == 0 && len(q.unmarked) == 0 {
		return nil
	}
	now := q.cfg.Now().UTC()
	b := &q.buf
	b.Records, b.Now = b.Records[:0], now
	for i := range q.unmarked {
		m := storage.Undelivered(&q.unmarked[i], now, storage.ReasonCommitUnconfirmed,
			"its append was reported as failed (caller gone or commit unacknowledged), so the certificate was withheld")
		m.Sanitize()
		b.Records = append(b.Records, *m)
	}
	markers := len(q.unmarked)
	for _, r := range live {
		b.Records = append(b.Records, r.rec)
	}
	if err := q.cfg.Commit(ctx, b); err != nil {
		q.failures.Add(1)
		if q.cfg.Settle != nil {
			q.doubt, q.inDoubt = append(q.doubt[:0], b.Records[markers:]...), true
		}
		clear(b.Records)
		return err
	}
	q.batches.Add(1)
	q.records.Add(uint64(len(b.Records)))
	q.undelivered.Add(uint64(markers))
	if markers > 0 {
		q.log.Warn("undelivered markers written", "store", q.cfg.Name, "writer", q.cfg.Writer, "records", seqsOf(q.unmarked))
	}
	q.unmarked = q.unmarked[:0]
	for i, r := range live {
		sealed := &b.Records[markers+i]
		switch {
		case r.state.CompareAndSwap(claimed, answered):
			if r.rejected != nil {
				r.done <- r.rejected
				continue
			}
			*r.out = *sealed
			r.batch = len(b.Records)
			r.done <- nil
		case r.rejected == nil: // abandoned: committed, but its caller heard "failed"
			q.unmarked = appendNeedingMarker(q.unmarked, *sealed)
		}
	}
	clear(b.Records) // drop references to callers' strings
	return nil
}

// settle asks the store whether the last failed transaction committed
// after all; if it did, its records need markers, and the markers it
// carried are in.
func (q *Queue) settle(ctx context.Context) error {
	if !q.inDoubt {
		return nil
	}
	committed, err := q.cfg.Settle(ctx)
	if err != nil {
		return err
	}
	if committed {
		q.log.Warn("failed audit batch had committed; marking its records undelivered", "store", q.cfg.Name,
			"writer", q.cfg.Writer, "records", seqsOf(q.doubt))
		q.undelivered.Add(uint64(len(q.unmarked)))
		q.unmarked = q.unmarked[:0]
		for _, r := range q.doubt {
			q.unmarked = appendNeedingMarker(q.unmarked, r)
		}
	}
	clear(q.doubt)
	q.doubt, q.inDoubt = q.doubt[:0], false
	return nil
}

// appendNeedingMarker adds r to the records awaiting an undelivered marker,
// unless r is itself a marker: being in the log is all a marker needs.
func appendNeedingMarker(list []storage.Record, r storage.Record) []storage.Record {
	if r.Outcome == storage.OutcomeUndelivered {
		return list
	}
	return append(list, r)
}

// seqsOf lists records as writer/seq for logs.
func seqsOf(recs []storage.Record) []string {
	out := make([]string, len(recs))
	for i := range recs {
		out[i] = recs[i].Writer + "/" + strconv.FormatUint(recs[i].Seq, 10)
	}
	return out
}
