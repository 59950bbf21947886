package queue

import (
	"context"
	"errors"
	"fmt"
	"io"

	bolt "go.etcd.io/bbolt"
)

// ErrExists is returned by Import for a queue ID that is already stored.
var ErrExists = errors.New("queue: message already exists")

// Import implements Backend: it keeps m's ID, its recipients with their
// states, replies and upstreams, its attempts, times, last reply and
// flags (held, DSN, warned), for a message carried over from another
// queue (Salvage). rest is kept in a spool file, as PutSpooled keeps a
// large message. Import returns once the message is on disk.
func (s *Store) Import(ctx context.Context, m Message, body []byte, rest io.Reader) (err error) {
	s.settle()
	if err := checkPut(ctx, &m); err != nil {
		return err
	}
	// The ID names the spool file, and must match the format of an ID that
	// Put gives, so that nothing else in the store can be named.
	if !validSpoolID(m.ID) {
		return fmt.Errorf("queue: import: %q is not a queue ID", m.ID)
	}
	m.Received, m.NextAttempt, m.LastAttempt = m.Received.Round(0), m.NextAttempt.Round(0), m.LastAttempt.Round(0)
	id := []byte(m.ID)
	// Looked up first, so that a message already stored costs no copy of
	// its spool file.
	if err := s.db.View(func(tx *bolt.Tx) error {
		if tx.Bucket(msgsBucket).Get(id) != nil {
			return ErrExists
		}
		return nil
	}); err != nil {
		return fmt.Errorf("queue: import %s: %w", m.ID, err)
	}

	rec := record{Message: m}
	if rest != nil {
		sp, err := s.NewSpool()
		if err != nil {
			return err
		}
		defer func() {
			if err != nil {
				sp.Abort()
			}
		}()
		if _, err := io.Copy(sp, rest); err != nil {
			return fmt.Errorf("queue: import %s: copy content: %w", m.ID, err)
		}
		if err := sp.place(s.spoolPath(m.ID)); err != nil {
			return err
		}
		defer func() {
			if err == nil {
				sp.name = "" // the queue owns the file now
			}
		}()
		rec.Spooled = true
	}
	v, err := encodeRecord(&rec)
	if err != nil {
		return fmt.Errorf("queue: import %s: %w", m.ID, err)
	}
	err = s.commit.write(func(tx *bolt.Tx) error {
		s.chooseFreelistSync(tx)
		return s.insert(tx, &rec, v, body, false)
	})
	if errors.Is(err, ErrExists) {
		return fmt.Errorf("queue: import %s: %w", m.ID, err)
	}
	if err != nil {
		return storageError("import "+m.ID, err)
	}
	s.notify()
	return nil
}
