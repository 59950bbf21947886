package queue

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The history's buckets. An index key is kind ‖ value ‖ 0 ‖
// be64(Received) ‖ ID, so that the messages of one recipient (kind "t"),
// sender ("f"), user ("u") or Message-ID ("m"), or all of them ("r"), are
// one range of keys in the order received: a lookup, not a scan.
var (
	historyBucket      = []byte("history")       // ID → JSON History
	historyIndexBucket = []byte("history_index") // see above → empty
	historyLeftBucket  = []byte("history_left")  // be64(Left) ‖ ID → empty, for the retention
)

// historyBuckets are created by prepare.
var historyBuckets = [][]byte{historyBucket, historyIndexBucket, historyLeftBucket}

func historyIndexKey(kind, value string, received time.Time, id string) []byte {
	k := make([]byte, 0, len(kind)+len(value)+1+8+len(id))
	k = append(k, kind...)
	k = append(k, value...)
	k = append(k, 0)
	k = binary.BigEndian.AppendUint64(k, uint64(received.UnixNano()))
	return append(k, id...)
}

func historyLeftKey(left time.Time, id string) []byte {
	return append(binary.BigEndian.AppendUint64(nil, uint64(left.UnixNano())), id...)
}

// putHistory writes h and, for a new one, its index entries.
func putHistory(tx *bolt.Tx, h *History, isNew bool) error {
	v, err := json.Marshal(h)
	if err != nil {
		return err
	}
	if err := tx.Bucket(historyBucket).Put([]byte(h.ID), v); err != nil {
		return err
	}
	if !isNew {
		return nil
	}
	idx := tx.Bucket(historyIndexBucket)
	for _, k := range h.keys() {
		if err := idx.Put(historyIndexKey(k[0], k[1], h.Received, h.ID), nil); err != nil {
			return err
		}
	}
	return nil
}

func getHistory(tx *bolt.Tx, id string) (*History, error) {
	return getJSON[History](tx.Bucket(historyBucket), id, "history of ")
}

// getJSON decodes the JSON value of key id in b; nil if there is none.
// what names the value in an error.
func getJSON[T any](b *bolt.Bucket, id, what string) (*T, error) {
	v := b.Get([]byte(id))
	if v == nil {
		return nil, nil
	}
	var x T
	if err := json.Unmarshal(v, &x); err != nil {
		return nil, fmt.Errorf("%s%s: %w", what, id, err)
	}
	return &x, nil
}

// deleteHistory removes h and its index entries.
func deleteHistory(tx *bolt.Tx, h *History) error {
	idx := tx.Bucket(historyIndexBucket)
	for _, k := range h.keys() {
		if err := idx.Delete(historyIndexKey(k[0], k[1], h.Received, h.ID)); err != nil {
			return err
		}
	}
	if !h.Left.IsZero() {
		if err := tx.Bucket(historyLeftBucket).Delete(historyLeftKey(h.Left, h.ID)); err != nil {
			return err
		}
	}
	return tx.Bucket(historyBucket).Delete([]byte(h.ID))
}

// addHistory appends events to the history of id, in tx. A message whose
// history is gone (stored before there was one) gets none.
func (s *Store) addHistory(tx *bolt.Tx, id string, events ...Event) error {
	if s.noHistory {
		return nil
	}
	h, err := getHistory(tx, id)
	if h == nil || err != nil {
		return err
	}
	h.Events = append(h.Events, events...)
	return putHistory(tx, h, false)
}

// leaveHistory records, with events, that id left the queue at left with
// outcome; with no retention its history goes with it.
func (s *Store) leaveHistory(tx *bolt.Tx, id string, left time.Time, outcome Outcome, events ...Event) error {
	if s.noHistory {
		return nil
	}
	h, err := getHistory(tx, id)
	if h == nil || err != nil {
		return err
	}
	if s.historyRetention <= 0 {
		return deleteHistory(tx, h)
	}
	h.Events = append(h.Events, events...)
	h.Left, h.Outcome = left, outcome
	if err := tx.Bucket(historyLeftBucket).Put(historyLeftKey(left, id), nil); err != nil {
		return err
	}
	return putHistory(tx, h, false)
}

// History implements Backend.
func (s *Store) History(id string) (*History, error) {
	s.settle()
	var h *History
	err := s.db.View(func(tx *bolt.Tx) error {
		var err error
		h, err = getHistory(tx, id)
		if err == nil && h == nil {
			err = ErrNotFound
		}
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("queue: history of %s: %w", id, err)
	}
	return h, nil
}

// FindHistory implements Backend: one range of the index, newest first,
// each history read and checked against the rest of the filter.
func (s *Store) FindHistory(f HistoryFilter) ([]History, error) {
	s.settle()
	kind, value := f.lookup()
	prefix := append(append([]byte(kind), value...), 0)
	var out []History
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(historyIndexBucket).Cursor()
		// From the last key not after Until, backwards.
		var k []byte
		if f.Until.IsZero() {
			end := append(bytes.Clone(prefix[:len(prefix)-1]), 1)
			if k, _ = c.Seek(end); k == nil {
				k, _ = c.Last()
			} else {
				k, _ = c.Prev()
			}
		} else {
			end := binary.BigEndian.AppendUint64(bytes.Clone(prefix), uint64(f.Until.UnixNano()+1))
			if k, _ = c.Seek(end); k == nil {
				k, _ = c.Last()
			} else {
				k, _ = c.Prev()
			}
		}
		for ; k != nil && bytes.HasPrefix(k, prefix) && len(out) < f.limit(); k, _ = c.Prev() {
			rest := k[len(prefix):]
			if len(rest) < 8 {
				continue
			}
			if !f.Since.IsZero() && int64(binary.BigEndian.Uint64(rest)) < f.Since.UnixNano() {
				break
			}
			h, err := getHistory(tx, string(rest[8:]))
			if err != nil {
				return err
			}
			if h != nil && f.matches(h) {
				h.Events = nil
				out = append(out, *h)
			}
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("queue: find history: %w", err)
	}
	return out, nil
}

// PruneHistory implements Backend: at most max histories in one commit.
func (s *Store) PruneHistory(before time.Time, max int) (int, error) {
	n := 0
	err := s.commit.writeLazy(func(tx *bolt.Tx) error {
		n = 0
		left := tx.Bucket(historyLeftBucket)
		var keys [][]byte
		c := left.Cursor()
		for k, _ := c.First(); k != nil && len(keys) < max; k, _ = c.Next() {
			if len(k) < 8 || int64(binary.BigEndian.Uint64(k)) >= before.UnixNano() {
				break
			}
			keys = append(keys, bytes.Clone(k))
		}
		for _, k := range keys {
			h, err := getHistory(tx, string(k[8:]))
			if err != nil {
				return err
			}
			if err := left.Delete(k); err != nil {
				return err
			}
			if h == nil {
				continue
			}
			if err := deleteHistory(tx, h); err != nil {
				return err
			}
			n++
		}
		return nil
	})
	if err != nil {
		return 0, storageError("prune history", err)
	}
	return n, nil
}
