package queue

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"
)

// Observer is told when messages leave the queue and when DSNs are stored,
// for metrics. Calls come after the change is committed, from the
// goroutine that made it, so they must be quick and safe for concurrent
// use.
type Observer interface {
	// Finished reports that m left the queue with outcome. m.DSN tells a
	// DSN apart from a message that a client submitted.
	Finished(m Message, outcome Outcome)
	// DSNQueued reports that a DSN of kind was stored.
	DSNQueued(kind BounceKind)
}

// Stats is the queue's size by state, and its oldest message. The states
// do not overlap: a held message that is being delivered counts as in
// flight.
type Stats struct {
	Queued   int // waiting for an attempt: neither held nor in flight
	Held     int // on hold, no attempt in progress
	InFlight int // an attempt in progress
	// Oldest is when the oldest queued message (held, in flight and DSNs
	// included) was received; zero when the queue is empty.
	Oldest time.Time
}

// Stats returns the queue's size by state. It costs the same with a
// million messages as with ten: the counts are kept up to date by every
// change (countsKey), the oldest message is the first entry of an index by
// Received, and only the claims, at most one per worker, are read.
func (s *Store) Stats() (Stats, error) {
	s.settle()
	var st Stats
	err := s.db.View(func(tx *bolt.Tx) error {
		c := readCounts(tx)
		msgs := tx.Bucket(msgsBucket)
		inFlight, heldInFlight := int64(0), int64(0)
		err := tx.Bucket(claimedBucket).ForEach(func(k, _ []byte) error {
			v := msgs.Get(k)
			if v == nil {
				return nil
			}
			inFlight++
			if rec, err := decodeRecord(v); err == nil && rec.Held {
				heldInFlight++
			}
			return nil
		})
		if err != nil {
			return err
		}
		st.InFlight = int(inFlight)
		st.Held = int(max(c.held-heldInFlight, 0))
		st.Queued = int(max(c.messages-c.held-(inFlight-heldInFlight), 0))
		if k, _ := tx.Bucket(receivedBucket).Cursor().First(); k != nil {
			if at, _, ok := parseDueKey(k); ok {
				st.Oldest = time.Unix(0, at)
			}
		}
		return nil
	})
	if err != nil {
		return Stats{}, fmt.Errorf("queue: stats: %w", err)
	}
	return st, nil
}

// counts are the message and held-message totals that metaBucket keeps
// under countsKey, so that the gauges never count a large queue.
type counts struct {
	messages, held int64
}

func readCounts(tx *bolt.Tx) counts {
	v := tx.Bucket(metaBucket).Get(countsKey)
	if len(v) != 16 {
		return counts{}
	}
	return counts{
		messages: int64(binary.BigEndian.Uint64(v[:8])),
		held:     int64(binary.BigEndian.Uint64(v[8:])),
	}
}

func writeCounts(tx *bolt.Tx, c counts) error {
	v := make([]byte, 16)
	binary.BigEndian.PutUint64(v[:8], uint64(max(c.messages, 0)))
	binary.BigEndian.PutUint64(v[8:], uint64(max(c.held, 0)))
	return tx.Bucket(metaBucket).Put(countsKey, v)
}

// addCounts changes the totals within tx, so that they commit or roll back
// with the change they count.
func addCounts(tx *bolt.Tx, messages, held int64) error {
	if messages == 0 && held == 0 {
		return nil
	}
	c := readCounts(tx)
	c.messages += messages
	c.held += held
	return writeCounts(tx, c)
}

// heldDelta is the change in the held total when a message goes from
// wasHeld to isHeld.
func heldDelta(wasHeld, isHeld bool) int64 {
	switch {
	case isHeld && !wasHeld:
		return 1
	case wasHeld && !isHeld:
		return -1
	}
	return 0
}

func b2i(b bool) int64 {
	if b {
		return 1
	}
	return 0
}

// indexCounts builds the totals and the index by Received for a file
// written before they existed. It runs once, at the first Open of such a
// file; unreadable records are counted but not indexed.
func indexCounts(tx *bolt.Tx) error {
	if err := tx.DeleteBucket(receivedBucket); err != nil && !errors.Is(err, berrors.ErrBucketNotFound) {
		return err
	}
	received, err := tx.CreateBucket(receivedBucket)
	if err != nil {
		return err
	}
	var c counts
	err = tx.Bucket(msgsBucket).ForEach(func(k, v []byte) error {
		c.messages++
		rec, err := decodeRecord(v)
		if err != nil || rec.ID != string(k) {
			return nil
		}
		c.held += b2i(rec.Held)
		return received.Put(receivedKey(rec.Received, rec.ID), nil)
	})
	if err != nil {
		return err
	}
	return writeCounts(tx, c)
}

// receivedKey is a key of receivedBucket: be64(Received) ‖ ID, so that the
// first key is the oldest message.
func receivedKey(t time.Time, id string) []byte { return dueKey(t, id) }

// deleteReceived removes id from the index by Received: at key when the
// record was readable, else by looking for it.
func deleteReceived(tx *bolt.Tx, id string, rec *record) error {
	b := tx.Bucket(receivedBucket)
	if rec != nil {
		return b.Delete(receivedKey(rec.Received, id))
	}
	return deleteDueEntries(b, id)
}
