package groupcommit

import (
	"time"

	"github.com/castellan-ca/castellan/storage"
)

// Batch is what one transaction writes: the undelivered markers due, then
// the callers' records, in chain order. Its records are validated and
// sanitised; Seal gives them their chain fields.
type Batch struct {
	// Records are written in this order; Commit may read but not reorder them.
	Records []storage.Record
	// Now fills a zero Record.Time when the batch is sealed.
	Now time.Time
}

// Seal continues a writer's chain whose newest committed record has seq and
// hash (0 and "" for an empty chain): it fills each record's zero Time with
// Now, then its Writer, Seq, PrevHash and Hash, in order. It returns the
// seq and hash of the last record. Commit calls it after reading the chain
// head inside its transaction, so a failed batch never advances the chain.
func (b *Batch) Seal(writer string, seq uint64, hash string) (lastSeq uint64, lastHash string) {
	for i := range b.Records {
		r := &b.Records[i]
		if r.Time.IsZero() {
			r.Time = b.Now
		}
		seq++
		r.Seal(writer, seq, hash)
		hash = r.Hash
	}
	return seq, hash
}
