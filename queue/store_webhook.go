package queue

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"time"

	bolt "go.etcd.io/bbolt"
)

// The webhook outbox's buckets: the posts by ID, and two indexes, by when
// each is due and by when its event happened (for the oldest's age).
var (
	webhooksBucket   = []byte("webhooks")    // ID → JSON WebhookPost
	webhookDueBucket = []byte("webhook_due") // be64(NextTry) ‖ ID → empty
	webhookAtBucket  = []byte("webhook_at")  // be64(At) ‖ ID → empty
)

var webhookBuckets = [][]byte{webhooksBucket, webhookDueBucket, webhookAtBucket}

func timeKey(t time.Time, id string) []byte {
	return append(binary.BigEndian.AppendUint64(nil, uint64(t.UnixNano())), id...)
}

// putWebhook stores p with its index entries; old, if not nil, is the
// stored version it replaces.
func putWebhook(tx *bolt.Tx, p, old *WebhookPost) error {
	if old != nil {
		if err := tx.Bucket(webhookDueBucket).Delete(timeKey(old.NextTry, old.ID)); err != nil {
			return err
		}
	} else if err := tx.Bucket(webhookAtBucket).Put(timeKey(p.At, p.ID), nil); err != nil {
		return err
	}
	v, err := json.Marshal(p)
	if err != nil {
		return err
	}
	if err := tx.Bucket(webhooksBucket).Put([]byte(p.ID), v); err != nil {
		return err
	}
	return tx.Bucket(webhookDueBucket).Put(timeKey(p.NextTry, p.ID), nil)
}

func putWebhooks(tx *bolt.Tx, posts []WebhookPost) error {
	for i := range posts {
		if err := putWebhook(tx, &posts[i], nil); err != nil {
			return err
		}
	}
	return nil
}

func getWebhook(tx *bolt.Tx, id string) (*WebhookPost, error) {
	return getJSON[WebhookPost](tx.Bucket(webhooksBucket), id, "webhook post ")
}

// DueWebhooks implements Backend.
func (s *Store) DueWebhooks(now time.Time, hold time.Duration, limit int) ([]WebhookPost, error) {
	var out []WebhookPost
	err := s.commit.write(func(tx *bolt.Tx) error {
		out = nil
		var ids []string
		c := tx.Bucket(webhookDueBucket).Cursor()
		end := now.UnixNano()
		for k, _ := c.First(); k != nil && len(ids) < limit; k, _ = c.Next() {
			if len(k) < 8 || int64(binary.BigEndian.Uint64(k)) > end {
				break
			}
			ids = append(ids, string(k[8:]))
		}
		for _, id := range ids {
			p, err := getWebhook(tx, id)
			if err != nil {
				return err
			}
			if p == nil {
				continue
			}
			taken := *p
			taken.NextTry = now.Add(hold).Round(0)
			if err := putWebhook(tx, &taken, p); err != nil {
				return err
			}
			out = append(out, *p)
		}
		return nil
	})
	if err != nil {
		return nil, storageError("take webhook posts", err)
	}
	return out, nil
}

// WebhookDone implements Backend.
func (s *Store) WebhookDone(id string) error {
	err := s.commit.write(func(tx *bolt.Tx) error {
		p, err := getWebhook(tx, id)
		if p == nil || err != nil {
			return err
		}
		if err := tx.Bucket(webhookDueBucket).Delete(timeKey(p.NextTry, id)); err != nil {
			return err
		}
		if err := tx.Bucket(webhookAtBucket).Delete(timeKey(p.At, id)); err != nil {
			return err
		}
		return tx.Bucket(webhooksBucket).Delete([]byte(id))
	})
	if err != nil {
		return storageError("webhook post "+id+" done", err)
	}
	return nil
}

// WebhookRetry implements Backend.
func (s *Store) WebhookRetry(id string, next time.Time) error {
	err := s.commit.write(func(tx *bolt.Tx) error {
		p, err := getWebhook(tx, id)
		if p == nil || err != nil {
			return err
		}
		again := *p
		again.Tries++
		again.NextTry = next.Round(0)
		return putWebhook(tx, &again, p)
	})
	if err != nil {
		return storageError("webhook post "+id+" retry", err)
	}
	return nil
}

// WebhookBacklog implements Backend: the index by event time counted
// (its pages read, not its posts) and its first key.
func (s *Store) WebhookBacklog() (n int, oldest time.Time, err error) {
	err = s.db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket(webhookAtBucket)
		n = b.Stats().KeyN
		if k, _ := b.Cursor().First(); len(k) >= 8 {
			oldest = time.Unix(0, int64(binary.BigEndian.Uint64(k)))
		}
		return nil
	})
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("queue: webhook backlog: %w", err)
	}
	return n, oldest, nil
}
