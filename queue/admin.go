package queue

import (
	"bytes"

	bolt "go.etcd.io/bbolt"
)

// The administrative operations below each run in one fsynced
// transaction and keep the due index in step with the records: a message
// that is not held has exactly one index entry, at its NextAttempt; a held
// message has none, so the scheduler never claims it.

// Delete removes the message with the given queue ID, its body (spool
// file included) and its index entry, without a bounce; ErrNotFound if
// there is none. A message being delivered is deleted too: when that
// attempt completes, its outcome is dropped (see Scheduler) and the
// message does not come back.
func (s *Store) Delete(id string) error {
	key := []byte(id)
	var gone Message // what the observer is told about
	now := s.now().Round(0)
	err := s.commit.update(func(tx *bolt.Tx) error {
		s.chooseFreelistSync(tx) // deleting a backlog frees many pages
		msgs, due := tx.Bucket(msgsBucket), tx.Bucket(dueBucket)
		v := msgs.Get(key)
		if v == nil {
			return ErrNotFound
		}
		rec, err := decodeRecord(v)
		if err != nil || rec.ID != id {
			// An unreadable record is what an operator deletes most: its
			// index entries cannot be computed, so look for them.
			rec = nil
			gone = Message{ID: id}
			if err := deleteDueEntries(due, id); err != nil {
				return err
			}
		} else {
			gone = rec.Message
			if err := due.Delete(dueKey(rec.NextAttempt, id)); err != nil {
				return err
			}
		}
		if err := deleteReceived(tx, id, rec); err != nil {
			return err
		}
		if err := addCounts(tx, -1, -b2i(rec != nil && rec.Held)); err != nil {
			return err
		}
		if err := msgs.Delete(key); err != nil {
			return err
		}
		if err := tx.Bucket(bodiesBucket).Delete(key); err != nil {
			return err
		}
		if err := s.leaveHistory(tx, id, now, OutcomeDeleted, Event{At: now, Type: EventDeleted}); err != nil {
			return err
		}
		return tx.Bucket(claimedBucket).Delete(key)
	})
	if err != nil {
		return storageError("delete "+id, err)
	}
	// After the commit, and whatever the record said: an unreadable one
	// may have had a file too.
	s.removeSpool(id)
	if s.observer != nil {
		s.observer.Finished(gone, OutcomeDeleted)
	}
	return nil
}

// deleteDueEntries removes every index entry for id.
func deleteDueEntries(due *bolt.Bucket, id string) error {
	var keys [][]byte
	c := due.Cursor()
	for k, _ := c.First(); k != nil; k, _ = c.Next() {
		if _, kid, ok := parseDueKey(k); ok && kid == id {
			keys = append(keys, bytes.Clone(k))
		}
	}
	for _, k := range keys {
		if err := due.Delete(k); err != nil {
			return err
		}
	}
	return nil
}

// Hold keeps the message out of delivery until Release; ErrNotFound if
// there is none. Holding a held message does nothing. A message being
// delivered finishes its attempt and then stays held.
func (s *Store) Hold(id string) error {
	return s.modify("hold", id, func(rec *record, _ bool) (bool, error) {
		if rec.Held {
			return false, nil
		}
		rec.Held = true
		return true, nil
	})
}

// Release ends a hold and makes the message due now; ErrNotFound if there
// is none. Releasing a message that is not held does nothing. A held
// message still being delivered keeps the next attempt that its current
// one scheduled.
func (s *Store) Release(id string) error {
	now := s.now().Round(0)
	err := s.modify("release", id, releaseAt(now))
	if err == nil {
		s.notify()
	}
	return err
}

// Retry makes the message due now; ErrNotFound if there is none, ErrHeld
// if it is held. For a message being delivered it does nothing: the
// attempt in progress is its retry.
func (s *Store) Retry(id string) error {
	now := s.now().Round(0)
	err := s.modify("retry", id, retryAt(now))
	if err == nil {
		s.notify()
	}
	return err
}

// adminEvents are the history's events of the administrative changes.
var adminEvents = map[string]EventType{"hold": EventHeld, "release": EventReleased, "retry": EventRetried}

// modify runs change on the record of id, whose inFlight tells whether an
// attempt is in progress, and if it reports a change stores the record and
// moves its index entry to the new NextAttempt, or removes it when held.
func (s *Store) modify(op, id string, change func(rec *record, inFlight bool) (bool, error)) error {
	key := []byte(id)
	event := Event{At: s.now().Round(0), Type: adminEvents[op]}
	err := s.commit.update(func(tx *bolt.Tx) error {
		msgs, due := tx.Bucket(msgsBucket), tx.Bucket(dueBucket)
		v := msgs.Get(key)
		if v == nil {
			return ErrNotFound
		}
		rec, err := decodeRecord(v)
		if err != nil {
			return err
		}
		oldDue, wasHeld := dueKey(rec.NextAttempt, id), rec.Held
		changed, err := change(rec, tx.Bucket(claimedBucket).Get(key) != nil)
		if err != nil || !changed {
			return err
		}
		if err := addCounts(tx, 0, heldDelta(wasHeld, rec.Held)); err != nil {
			return err
		}
		if err := due.Delete(oldDue); err != nil {
			return err
		}
		if !rec.Held {
			if err := due.Put(dueKey(rec.NextAttempt, id), nil); err != nil {
				return err
			}
		}
		if err := s.addHistory(tx, id, event); err != nil {
			return err
		}
		return putRecord(msgs, rec)
	})
	if err != nil {
		return storageError(op+" "+id, err)
	}
	return nil
}

// Flush makes every queued message due now, except held ones and those
// being delivered, and returns how many messages that is (including those
// that were due already). Unreadable records are left alone.
func (s *Store) Flush() (int, error) {
	now := s.now().Round(0)
	var n int
	err := s.commit.update(func(tx *bolt.Tx) error {
		n = 0
		msgs, due, claimed := tx.Bucket(msgsBucket), tx.Bucket(dueBucket), tx.Bucket(claimedBucket)
		var later []*record
		err := msgs.ForEach(func(k, v []byte) error {
			rec, err := decodeRecord(v)
			if err != nil || rec.Held || claimed.Get(k) != nil {
				return nil
			}
			n++
			if rec.NextAttempt.After(now) {
				later = append(later, rec)
			}
			return nil
		})
		if err != nil {
			return err
		}
		// The bucket may change only after ForEach has returned.
		for _, rec := range later {
			if err := due.Delete(dueKey(rec.NextAttempt, rec.ID)); err != nil {
				return err
			}
			rec.NextAttempt = now
			if err := due.Put(dueKey(rec.NextAttempt, rec.ID), nil); err != nil {
				return err
			}
			if err := putRecord(msgs, rec); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return 0, storageError("flush", err)
	}
	s.notify()
	return n, nil
}
