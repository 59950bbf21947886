package queue

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgInFlight is the condition of a row being delivered: a lease that has
// not lapsed. Leases go by the database's clock, which every replica shares.
const pgInFlight = `(lease_owner IS NOT NULL AND lease_until >= now())`

// Get implements Backend. InFlight tells whether a lease holds.
func (s *PGStore) Get(id string) (*Entry, error) {
	ctx, cancel := opContext()
	defer cancel()
	var (
		v        []byte
		inFlight bool
	)
	err := s.pool.QueryRow(ctx, `SELECT record, `+pgInFlight+` FROM queue_messages WHERE id = $1`, id).Scan(&v, &inFlight)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("queue: get %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("queue: get %s: %w", id, err)
	}
	rec, err := decodeRecord(v)
	if err != nil {
		return nil, fmt.Errorf("queue: get %s: %w", id, err)
	}
	return &Entry{Message: rec.Message, InFlight: inFlight}, nil
}

// List implements Backend.
func (s *PGStore) List() ([]Entry, []Unreadable, error) {
	ctx, cancel := opContext()
	defer cancel()
	rows, err := s.pool.Query(ctx, `SELECT id, record, `+pgInFlight+` FROM queue_messages ORDER BY received, id`)
	if err != nil {
		return nil, nil, fmt.Errorf("queue: list: %w", err)
	}
	var (
		out      []Entry
		bad      []Unreadable
		id       string
		v        []byte
		inFlight bool
	)
	_, err = pgx.ForEachRow(rows, []any{&id, &v, &inFlight}, func() error {
		rec, err := decodeRecord(v)
		if err == nil && rec.ID != id {
			err = fmt.Errorf("the record is that of %q", rec.ID)
		}
		if err != nil {
			bad = append(bad, Unreadable{ID: id, Reason: err.Error()})
			return nil
		}
		out = append(out, Entry{Message: rec.Message, InFlight: inFlight})
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("queue: list: %w", err)
	}
	// The column orders by the microsecond; the record decides.
	slices.SortStableFunc(out, func(a, b Entry) int {
		if c := a.Received.Compare(b.Received); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out, bad, nil
}

// Delete implements Backend: the row and its chunks in one statement. An
// attempt in progress then finds the row gone and records nothing.
func (s *PGStore) Delete(id string) error {
	if err := s.checkOpen("delete " + id); err != nil {
		return err
	}
	ctx, cancel := opContext()
	defer cancel()
	now := pgTime(s.now())
	evs, err := encodeEvents([]Event{{At: now, Type: EventDeleted}})
	if err != nil {
		return fmt.Errorf("queue: delete %s: %w", id, err)
	}
	var v []byte
	err = s.pool.QueryRow(ctx, `WITH m AS (DELETE FROM queue_messages WHERE id = $1 RETURNING id, record),
		b AS (DELETE FROM queue_bodies WHERE id = $1)`+s.pgLeaveCTEs("$2", "$3", "$4")+`
		SELECT record FROM m`, id, evs, now, string(OutcomeDeleted)).Scan(&v)
	if errors.Is(err, pgx.ErrNoRows) {
		s.committed()
		return fmt.Errorf("queue: delete %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return s.pgError(ctx, "delete "+id, err)
	}
	s.committed()
	if s.observer != nil {
		gone := Message{ID: id}
		if rec, err := decodeRecord(v); err == nil && rec.ID == id {
			gone = rec.Message
		}
		s.observer.Finished(gone, OutcomeDeleted)
	}
	return nil
}

// Hold implements Backend.
func (s *PGStore) Hold(id string) error {
	return s.modify("hold", id, false, func(rec *record, _ bool) (bool, error) {
		if rec.Held {
			return false, nil
		}
		rec.Held = true
		return true, nil
	})
}

// Release implements Backend.
func (s *PGStore) Release(id string) error {
	now := pgTime(s.now())
	err := s.modify("release", id, true, releaseAt(now))
	if err == nil {
		s.notify()
	}
	return err
}

// Retry implements Backend.
func (s *PGStore) Retry(id string) error {
	now := pgTime(s.now())
	err := s.modify("retry", id, true, retryAt(now))
	if err == nil {
		s.notify()
	}
	return err
}

// modify runs change on the record of id, locked, whose inFlight tells
// whether a lease holds, and stores what it changed; wake NOTIFYs the
// other replicas of a change.
func (s *PGStore) modify(op, id string, wake bool, change func(rec *record, inFlight bool) (bool, error)) error {
	if err := s.checkOpen(op + " " + id); err != nil {
		return err
	}
	ctx, cancel := opContext()
	defer cancel()
	event := Event{At: pgTime(s.now()), Type: adminEvents[op]}
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var (
			v        []byte
			inFlight bool
		)
		err := tx.QueryRow(ctx, `SELECT record, `+pgInFlight+` FROM queue_messages WHERE id = $1 FOR UPDATE`, id).Scan(&v, &inFlight)
		if errors.Is(err, pgx.ErrNoRows) {
			return ErrNotFound
		}
		if err != nil {
			return err
		}
		rec, err := decodeRecord(v)
		if err != nil {
			return err
		}
		changed, err := change(rec, inFlight)
		if err != nil || !changed {
			return err
		}
		pgTimes(&rec.Message)
		nv, err := encodeRecord(rec)
		if err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, `UPDATE queue_messages SET record = $2, next_attempt = $3, held = $4 WHERE id = $1`,
			id, nv, rec.NextAttempt, rec.Held); err != nil {
			return err
		}
		if err := s.addHistory(ctx, tx, id, []Event{event}); err != nil {
			return err
		}
		if wake {
			_, err = tx.Exec(ctx, `SELECT pg_notify('`+pgChannel+`', '')`)
		}
		return err
	})
	switch {
	case errors.Is(err, ErrNotFound), errors.Is(err, ErrHeld):
		s.committed()
		return fmt.Errorf("queue: %s %s: %w", op, id, err)
	case err != nil:
		return s.pgError(ctx, op+" "+id, err)
	}
	s.committed()
	return nil
}

// Flush implements Backend. It reads the records of every message neither
// held nor being delivered, as the bbolt Store does: the count leaves
// out those that cannot be decoded.
func (s *PGStore) Flush() (int, error) {
	if err := s.checkOpen("flush"); err != nil {
		return 0, err
	}
	ctx, cancel := opContext()
	defer cancel()
	now := pgTime(s.now())
	var n int
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		n = 0
		rows, err := tx.Query(ctx, `SELECT id, record FROM queue_messages
			WHERE NOT held AND NOT `+pgInFlight+` ORDER BY id FOR UPDATE`)
		if err != nil {
			return err
		}
		var (
			ids     []string
			records [][]byte
			id      string
			v       []byte
		)
		if _, err := pgx.ForEachRow(rows, []any{&id, &v}, func() error {
			rec, err := decodeRecord(v)
			if err != nil || rec.ID != id || rec.Held {
				return nil
			}
			n++
			if !rec.NextAttempt.After(now) {
				return nil
			}
			rec.NextAttempt = now
			nv, err := encodeRecord(rec)
			if err != nil {
				return err
			}
			ids, records = append(ids, id), append(records, nv)
			return nil
		}); err != nil {
			return err
		}
		if len(ids) > 0 {
			if _, err := tx.Exec(ctx, `UPDATE queue_messages m SET record = u.record, next_attempt = $1
				FROM unnest($2::text[], $3::bytea[]) AS u(id, record) WHERE m.id = u.id`, now, ids, records); err != nil {
				return err
			}
		}
		_, err = tx.Exec(ctx, `SELECT pg_notify('`+pgChannel+`', '')`)
		return err
	})
	if err != nil {
		return 0, s.pgError(ctx, "flush", err)
	}
	s.committed()
	s.notify()
	return n, nil
}

// pgStatsSQL counts by state from the indexes: every message (by
// received), the held ones (a partial index), those being delivered (a
// partial index of the leases, at most one per worker of each replica),
// and the oldest.
const pgStatsSQL = `SELECT
	(SELECT count(*) FROM queue_messages),
	(SELECT count(*) FROM queue_messages WHERE held),
	(SELECT count(*) FROM queue_messages WHERE ` + pgInFlight + `),
	(SELECT count(*) FROM queue_messages WHERE held AND ` + pgInFlight + `),
	(SELECT min(received) FROM queue_messages)`

// Stats implements Backend: counted by SQL, no record read.
func (s *PGStore) Stats() (Stats, error) {
	ctx, cancel := opContext()
	defer cancel()
	var (
		all, held, inFlight, heldInFlight int
		oldest                            *time.Time
	)
	if err := s.pool.QueryRow(ctx, pgStatsSQL).Scan(&all, &held, &inFlight, &heldInFlight, &oldest); err != nil {
		return Stats{}, fmt.Errorf("queue: stats: %w", err)
	}
	st := Stats{
		InFlight: inFlight,
		Held:     max(held-heldInFlight, 0),
		Queued:   max(all-held-(inFlight-heldInFlight), 0),
	}
	if oldest != nil {
		st.Oldest = *oldest
	}
	return st, nil
}

// Len implements Backend.
func (s *PGStore) Len() (int, error) {
	ctx, cancel := opContext()
	defer cancel()
	var n int
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM queue_messages`).Scan(&n); err != nil {
		return 0, fmt.Errorf("queue: len: %w", err)
	}
	return n, nil
}
