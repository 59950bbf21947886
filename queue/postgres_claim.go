package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgInsertSQL stores a new message with its head (or whole body) as
// chunk 0, and its history ($10…, pgHistoryArgs), in one statement:
// nothing if the ID is taken (no row comes back). $6 set claims it for
// this store, under a new token; $9 sends the NOTIFY that wakes idle
// replicas, with the commit.
var pgInsertSQL = `WITH m AS (
	INSERT INTO queue_messages (id, record, received, next_attempt, held, lease_owner, lease_until, token)
	VALUES ($1, $2, $3, $4, $5, $6::text, now() + $7::bigint * interval '1 microsecond', CASE WHEN $6::text IS NULL THEN NULL ELSE nextval('queue_token') END)
	ON CONFLICT (id) DO NOTHING
	RETURNING id, token
), b AS (
	INSERT INTO queue_bodies (id, seq, data) SELECT id, 0, $8 FROM m
), h AS (
	INSERT INTO queue_history (id, head, sender, username, msg_id, received) SELECT id, $10, $11, $12, $13, $3 FROM m
	ON CONFLICT (id) DO NOTHING
), hr AS (
	INSERT INTO queue_history_rcpts (rcpt, received, id) SELECT unnest($14::text[]), $3, id FROM m
	ON CONFLICT DO NOTHING
), he AS (
	INSERT INTO queue_history_events (id, event) SELECT id, $15 FROM m
)` + pgPostsCTE(16) + `
SELECT coalesce(token, 0) FROM m WHERE CASE WHEN $9 THEN pg_notify('` + pgChannel + `', '') IS NOT NULL ELSE true END`

// pgChunkSQL stores one chunk of a message's content past its head.
const pgChunkSQL = `INSERT INTO queue_bodies (id, seq, data) VALUES ($1, $2, $3)`

// pgChunk is the size of the chunks that the content of a spooled message
// is stored and read in: one chunk at a time is in memory.
const pgChunk = 256 << 10

// insertMessage stores rec, encoded as v, with head as chunk 0. leased
// claims it for this store and returns the attempt's token. It returns
// ErrExists if the ID is taken.
func (s *PGStore) insertMessage(ctx context.Context, q pgx.Tx, rec *record, v, head []byte, leased, notify bool, posts []WebhookPost) (uint64, error) {
	var owner, until any
	if leased {
		owner, until = s.owner, s.lease.Microseconds()
	}
	if head == nil {
		head = []byte{}
	}
	h, err := newPGHistoryArgs(&rec.Message)
	if err != nil {
		return 0, err
	}
	wh, err := newPGPosts(posts)
	if err != nil {
		return 0, err
	}
	args := append([]any{rec.ID, v, rec.Received, rec.NextAttempt, rec.Held, owner, until, head, notify,
		h.head, h.sender, h.user, h.messageID, h.rcpts, h.accepted}, wh.args()...)
	var row pgx.Row
	if q != nil {
		row = q.QueryRow(ctx, pgInsertSQL, args...)
	} else {
		row = s.pool.QueryRow(ctx, pgInsertSQL, args...)
	}
	var token int64
	if err := row.Scan(&token); errors.Is(err, pgx.ErrNoRows) {
		return 0, ErrExists
	} else if err != nil {
		return 0, err
	}
	return uint64(token), nil
}

// insertChunks streams what r reads into chunks 1… of message id, within
// tx, one chunk in memory at a time, and returns how many bytes that was.
func insertChunks(ctx context.Context, tx pgx.Tx, id string, r io.Reader) (int64, error) {
	buf := make([]byte, pgChunk)
	var total int64
	for seq := 1; ; seq++ {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			if _, err := tx.Exec(ctx, pgChunkSQL, id, seq, buf[:n]); err != nil {
				return total, err
			}
			total += int64(n)
		}
		switch {
		case err == io.EOF || err == io.ErrUnexpectedEOF:
			return total, nil
		case err != nil:
			return total, &readError{err}
		}
	}
}

// readError is a failure to read the content being stored, not of the
// database.
type readError struct{ err error }

func (e *readError) Error() string { return "read content: " + e.err.Error() }
func (e *readError) Unwrap() error { return e.err }

// Put implements Backend: it returns once the message is committed, in
// one statement. A message that the Intake takes is stored claimed by
// this store, and its attempt handed over after the commit.
func (s *PGStore) Put(ctx context.Context, m *Message, body []byte) error {
	return s.put(ctx, m, body, nil)
}

// put is Put; rest, if not nil, is the spool file of a message whose
// head is body, streamed into the database in the transaction that
// stores the message.
func (s *PGStore) put(ctx context.Context, m *Message, body []byte, rest *os.File) error {
	if err := s.checkOpen("put"); err != nil {
		return err
	}
	if err := checkPut(ctx, m); err != nil {
		return err
	}
	rec := newRecord(m, body, rest != nil, s.now(), pgTime)
	in := s.intake.reserve(&rec)
	taken := in != nil
	if taken {
		pgTimes(&rec.Message)
	}
	var restR io.Reader // not a nil *os.File in an interface
	if rest != nil {
		restR = rest
	}
	bctx, cancel := bound(ctx)
	sent := time.Now()
	token, stored, err := s.store(bctx, &rec, body, restR, taken)
	cancel()
	if err != nil {
		if taken {
			in.Cancel(m.ID)
		}
		if errors.Is(err, ErrExists) {
			return fmt.Errorf("queue: put %s: %w", m.ID, err)
		}
		return s.pgError(ctx, "put "+m.ID, err)
	}
	s.committed()
	if taken {
		lapsed := s.hold(token, sent)
		in.Enqueue(Attempt{Message: rec.Message, Token: token, head: body, spooled: rec.Spooled, stored: stored, lapsed: lapsed})
		return nil
	}
	s.notify()
	return nil
}

// store inserts rec with its content, head followed by what rest reads,
// in one commit, and NOTIFYs unless leased. It returns the token of the
// claim when leased, and the record as stored.
func (s *PGStore) store(ctx context.Context, rec *record, head []byte, rest io.Reader, leased bool) (uint64, []byte, error) {
	v, err := encodeRecord(rec)
	if err != nil {
		return 0, nil, err
	}
	if rest == nil {
		token, err := s.insertMessage(ctx, nil, rec, v, head, leased, !leased, acceptedPosts(s.subs, &rec.Message))
		return token, v, err
	}
	var token uint64
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var err error
		if token, err = s.insertMessage(ctx, tx, rec, v, head, leased, !leased, acceptedPosts(s.subs, &rec.Message)); err != nil {
			return err
		}
		_, err = insertChunks(ctx, tx, rec.ID, rest)
		return err
	})
	return token, v, err
}

// NewSpool implements Backend: an empty file in SpoolDir, whose content
// PutSpooled streams into the database and then removes.
func (s *PGStore) NewSpool() (*Spool, error) {
	f, err := os.CreateTemp(s.spoolDir, tmpPrefix+"*")
	if err != nil {
		return nil, fmt.Errorf("queue: new spool file: %w", err)
	}
	return &Spool{dir: s.spoolDir, f: f, name: f.Name()}, nil
}

// PutSpooled implements Backend: the spool file is streamed into chunks
// in the transaction that stores the message, and removed whatever the
// outcome.
func (s *PGStore) PutSpooled(ctx context.Context, m *Message, head []byte, sp *Spool) error {
	defer sp.Abort() // the content is in the database, or the Put failed
	if sp.dir != s.spoolDir {
		return errors.New("queue: put: spool of another store")
	}
	if sp.err != nil {
		return sp.err
	}
	if sp.f == nil {
		return errors.New("queue: put: spool already stored")
	}
	if m.Size == 0 {
		m.Size = int64(len(head)) + sp.size
	}
	if sp.size == 0 {
		return s.put(ctx, m, head, nil)
	}
	if _, err := sp.f.Seek(0, io.SeekStart); err != nil {
		return fmt.Errorf("queue: put: rewind spool file: %w", err)
	}
	return s.put(ctx, m, head, sp.f)
}

// Import implements Backend: m as it is, with rest streamed into chunks
// in the transaction that stores it. An ID imported once is refused with
// ErrExists ever after, even once its message has left the queue.
func (s *PGStore) Import(ctx context.Context, m Message, body []byte, rest io.Reader) error {
	if err := s.checkOpen("import"); err != nil {
		return err
	}
	if err := checkPut(ctx, &m); err != nil {
		return err
	}
	if !validSpoolID(m.ID) {
		return fmt.Errorf("queue: import: %q is not a queue ID", m.ID)
	}
	pgTimes(&m)
	// Looked up first, so that a message already stored, or imported
	// once and delivered since, costs no copy of its content.
	var exists bool
	if err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM queue_messages WHERE id = $1)
		OR EXISTS (SELECT 1 FROM queue_imported WHERE id = $1)`, m.ID).Scan(&exists); err != nil {
		return s.pgError(ctx, "import "+m.ID, err)
	}
	if exists {
		return fmt.Errorf("queue: import %s: %w", m.ID, ErrExists)
	}
	rec := record{Message: m}
	var peek [1]byte
	if rest != nil {
		// A rest that reads nothing is no rest: the message is stored whole.
		n, err := io.ReadFull(rest, peek[:])
		switch {
		case n == 1:
			rest = io.MultiReader(bytes.NewReader(peek[:]), rest)
			rec.Spooled = true
		case err == io.EOF:
			rest = nil
		default:
			return fmt.Errorf("queue: import %s: read content: %w", m.ID, err)
		}
	}
	bctx, cancel := bound(ctx)
	defer cancel()
	v, err := encodeRecord(&rec)
	if err != nil {
		return fmt.Errorf("queue: import %s: %w", m.ID, err)
	}
	// The ID is recorded as imported with the message, so that importing
	// the same file again adds nothing, even what has left the queue.
	err = pgx.BeginFunc(bctx, s.pool, func(tx pgx.Tx) error {
		tag, err := tx.Exec(bctx, `INSERT INTO queue_imported (id) VALUES ($1) ON CONFLICT DO NOTHING`, m.ID)
		if err != nil {
			return err
		}
		if tag.RowsAffected() == 0 {
			return ErrExists
		}
		if _, err := s.insertMessage(bctx, tx, &rec, v, body, false, true, nil); err != nil {
			return err
		}
		if rest != nil {
			_, err = insertChunks(bctx, tx, rec.ID, rest)
		}
		return err
	})
	if err != nil {
		var re *readError
		if errors.Is(err, ErrExists) || errors.As(err, &re) {
			return fmt.Errorf("queue: import %s: %w", m.ID, err)
		}
		return s.pgError(ctx, "import "+m.ID, err)
	}
	s.committed()
	s.notify()
	return nil
}

// pgClaimSQL selects and locks up to $4 messages due at $1 whose lease,
// if any, has lapsed, after ($2, $3) in due order, with their heads.
// Leases go by the database's clock, which every replica shares. Rows that another Claim holds are passed over.
const pgClaimSQL = `SELECT m.id, m.next_attempt, m.record, m.lease_owner, b.data
FROM queue_messages m LEFT JOIN queue_bodies b ON b.id = m.id AND b.seq = 0
WHERE NOT m.held AND m.next_attempt <= $1 AND (m.lease_owner IS NULL OR m.lease_until < now())
	AND (m.next_attempt, m.id) > ($2, $3)
ORDER BY m.next_attempt, m.id
LIMIT $4
FOR UPDATE OF m SKIP LOCKED`

// pgRecordClaimsSQL records the attempts of one Claim, each under a new
// token, leased to $1 for $2 microseconds.
const pgRecordClaimsSQL = `UPDATE queue_messages m
SET record = u.record, next_attempt = u.next_attempt, lease_owner = $1, lease_until = now() + $2 * interval '1 microsecond', token = nextval('queue_token')
FROM unnest($3::text[], $4::bytea[], $5::timestamptz[]) AS u(id, record, next_attempt)
WHERE m.id = u.id
RETURNING m.id, m.token`

// Claim implements Backend: it locks due rows with SKIP LOCKED, so that
// concurrent Claims, of this store or of other replicas, pass over each
// other's, and records each attempt with its lease in one commit. A row
// whose lease lapsed is taken over: its owner died, or lost the database,
// during the attempt.
func (s *PGStore) Claim(ctx context.Context, at Start, limit int, skip func(id string) bool) (Claimed, error) {
	if err := s.checkOpen("claim"); err != nil {
		return Claimed{}, err
	}
	if err := ctx.Err(); err != nil {
		return Claimed{}, fmt.Errorf("queue: claim: %w", err)
	}
	if skip == nil {
		skip = func(string) bool { return false }
	}
	if c, ok := s.nothingDue(at.Now); ok {
		return c, nil
	}
	// Changes from here on call for the next Claim to look again.
	s.mustScan.Store(false)
	sent := time.Now()
	now := pgTime(at.Now)
	bctx, cancel := bound(ctx)
	defer cancel()
	var (
		c         Claimed
		takenFrom [][2]string // the IDs and owners of lapsed leases taken over
	)
	err := pgx.BeginFunc(bctx, s.pool, func(tx pgx.Tx) error {
		ctx := bctx
		c, takenFrom = Claimed{}, nil
		var (
			ids     []string
			records [][]byte
			nexts   []time.Time
			heads   = map[string][]byte{}
			msgs    = map[string]*record{}
			encoded = map[string][]byte{}
		)
		after, afterID := time.Time{}, ""
		for len(ids) < limit {
			want := limit - len(ids)
			rows, err := tx.Query(ctx, pgClaimSQL, now, after, afterID, want)
			if err != nil {
				return err
			}
			got := 0
			var (
				id      string
				due     time.Time
				v, head []byte
				owner   *string
			)
			_, err = pgx.ForEachRow(rows, []any{&id, &due, &v, &owner, &head}, func() error {
				got++
				after, afterID = due, id
				rec, err := decodeRecord(v)
				if err != nil || rec.ID != id || head == nil {
					c.Unreadable = append(c.Unreadable, id)
					return nil
				}
				if rec.Held || skip(id) {
					return nil
				}
				if owner != nil {
					takenFrom = append(takenFrom, [2]string{id, *owner})
				}
				begin(&rec.Message, at)
				pgTimes(&rec.Message)
				enc, err := encodeRecord(rec)
				if err != nil {
					return err
				}
				ids, records, nexts = append(ids, id), append(records, enc), append(nexts, rec.NextAttempt)
				heads[id], msgs[id], encoded[id] = head, rec, enc
				return nil
			})
			if err != nil {
				return err
			}
			if got < want {
				break
			}
		}
		if len(c.Unreadable) > 0 {
			// Out of due order for good, so that they are not retried in a
			// loop; List shows them and Delete removes them.
			if _, err := tx.Exec(ctx, `UPDATE queue_messages SET next_attempt = 'infinity' WHERE id = ANY($1)`, c.Unreadable); err != nil {
				return err
			}
		}
		if len(ids) > 0 {
			rows, err := tx.Query(ctx, pgRecordClaimsSQL, s.owner, s.lease.Microseconds(), ids, records, nexts)
			if err != nil {
				return err
			}
			tokens := map[string]uint64{}
			var id string
			var token int64
			if _, err := pgx.ForEachRow(rows, []any{&id, &token}, func() error {
				tokens[id] = uint64(token)
				return nil
			}); err != nil {
				return err
			}
			for _, id := range ids {
				rec := msgs[id]
				c.Attempts = append(c.Attempts, Attempt{Message: rec.Message, Token: tokens[id], head: heads[id], spooled: rec.Spooled, stored: encoded[id]})
			}
		}
		var err error
		c.Wake, err = s.nextWake(ctx, tx, skip)
		return err
	})
	if err != nil {
		s.rescan()
		return Claimed{}, s.pgError(ctx, "claim", err)
	}
	s.committed()
	s.scanned(c, len(c.Attempts) == limit)
	for i := range c.Attempts {
		c.Attempts[i].lapsed = s.hold(c.Attempts[i].Token, sent)
	}
	for _, t := range takenFrom {
		s.takeovers.Add(1)
		s.log.Warn("queue: took over a message whose lease lapsed during an attempt; it may reach its recipients twice",
			"queue_id", t[0], "previous_owner", t[1])
	}
	return c, nil
}

// pgWakeSQL lists messages not held and not being delivered, in due
// order after ($1, $2).
const pgWakeSQL = `SELECT id, next_attempt FROM queue_messages
WHERE NOT held AND next_attempt < 'infinity' AND (lease_owner IS NULL OR lease_until < now())
	AND (next_attempt, id) > ($1, $2)
ORDER BY next_attempt, id
LIMIT 64`

// nextWake returns when the earliest message that skip does not reject
// may be claimed: its NextAttempt, or for one being delivered the later
// of that and the end of its lease, which spares a replica that sees
// another's attempt run past its retry time a loop of empty Claims.
func (s *PGStore) nextWake(ctx context.Context, tx pgx.Tx, skip func(string) bool) (time.Time, error) {
	var wake time.Time
	after, afterID := time.Time{}, ""
	for {
		rows, err := tx.Query(ctx, pgWakeSQL, after, afterID)
		if err != nil {
			return time.Time{}, err
		}
		got := 0
		var id string
		var at time.Time
		if _, err := pgx.ForEachRow(rows, []any{&id, &at}, func() error {
			got++
			after, afterID = at, id
			if wake.IsZero() && !skip(id) {
				wake = at
			}
			return nil
		}); err != nil {
			return time.Time{}, err
		}
		if !wake.IsZero() || got < 64 {
			break
		}
	}
	rows, err := tx.Query(ctx, `SELECT id, greatest(next_attempt, lease_until) FROM queue_messages
		WHERE NOT held AND lease_owner IS NOT NULL AND lease_until >= now() AND next_attempt < 'infinity'`)
	if err != nil {
		return time.Time{}, err
	}
	var id string
	var at time.Time
	_, err = pgx.ForEachRow(rows, []any{&id, &at}, func() error {
		if !skip(id) && (wake.IsZero() || at.Before(wake)) {
			wake = at
		}
		return nil
	})
	return wake, err
}

// Finish implements Backend: in one transaction, the row locked, the
// outcome recorded and the lease ended, or the message and its content
// deleted, and the DSNs stored.
func (s *PGStore) Finish(ctx context.Context, a Attempt, events []Event, update func(m *Message) (remove bool, dsns []DSN)) (Finished, error) {
	id := a.Message.ID
	if err := s.checkOpen("finish " + id); err != nil {
		return Finished{}, err
	}
	if err := ctx.Err(); err != nil {
		return Finished{}, fmt.Errorf("queue: finish %s: %w", id, err)
	}
	// Whatever comes of it, the attempt is over: a lease that stays
	// recorded lapses, and the message is retried.
	defer s.release(a.Token)
	bctx, cancel := bound(ctx)
	defer cancel()
	left := pgTime(s.now())
	var posts []WebhookPost
	if !a.Message.DSN {
		posts = webhookPosts(s.subs, &a.Message, events)
	}
	if f, done, err := s.finishUnchanged(bctx, a, events, posts, left, update); done || err != nil {
		if err != nil {
			return Finished{}, s.pgError(ctx, "finish "+id, err)
		}
		return f, nil
	}
	var (
		f     Finished
		added []DSN
		wake  bool
	)
	err := pgx.BeginFunc(bctx, s.pool, func(tx pgx.Tx) error {
		ctx := bctx
		f, added, wake = Finished{}, nil, false
		var (
			v     []byte
			owner *string
			token *int64
		)
		err := tx.QueryRow(ctx, `SELECT record, lease_owner, token FROM queue_messages WHERE id = $1 FOR UPDATE`, id).Scan(&v, &owner, &token)
		if errors.Is(err, pgx.ErrNoRows) {
			return ErrNotFound
		}
		if err != nil {
			return err
		}
		if owner == nil || *owner != s.owner || token == nil || uint64(*token) != a.Token {
			return ErrClaimLost
		}
		rec, err := decodeRecord(v)
		if err != nil {
			return err
		}
		if err := insertPosts(ctx, tx, posts); err != nil {
			return err
		}
		remove, dsns := update(&rec.Message)
		f, added = Finished{Message: rec.Message, Removed: remove}, dsns
		for _, n := range dsns {
			d := record{Message: n.Message}
			pgTimes(&d.Message)
			dv, err := encodeRecord(&d)
			if err != nil {
				return err
			}
			if _, err := s.insertMessage(ctx, tx, &d, dv, n.Body, false, true, nil); err != nil {
				if errors.Is(err, ErrExists) {
					return fmt.Errorf("dsn %s: %w", n.Message.ID, err)
				}
				return err
			}
			wake = true
		}
		if remove {
			if err := s.leaveHistory(ctx, tx, id, left, finishedOutcome(rec.Message), events); err != nil {
				return err
			}
			_, err := tx.Exec(ctx, `WITH b AS (DELETE FROM queue_bodies WHERE id = $1)
				DELETE FROM queue_messages WHERE id = $1`, id)
			return err
		}
		if err := s.addHistory(ctx, tx, id, events); err != nil {
			return err
		}
		pgTimes(&rec.Message)
		f.Message = rec.Message
		if nv, err := encodeRecord(rec); err != nil {
			return err
		} else if _, err := tx.Exec(ctx, `UPDATE queue_messages
			SET record = $2, next_attempt = $3, held = $4, lease_owner = NULL, lease_until = NULL, token = NULL
			WHERE id = $1`, id, nv, rec.NextAttempt, rec.Held); err != nil {
			return err
		}
		// Due already: another replica may take it before this one looks.
		if !rec.Held && !rec.NextAttempt.After(pgTime(s.now())) {
			wake = true
			_, err := tx.Exec(ctx, `SELECT pg_notify('`+pgChannel+`', '')`)
			return err
		}
		return nil
	})
	switch {
	case errors.Is(err, ErrNotFound), errors.Is(err, ErrClaimLost), errors.Is(err, ErrExists):
		return Finished{}, fmt.Errorf("queue: finish %s: %w", id, err)
	case err != nil:
		return Finished{}, s.pgError(ctx, "finish "+id, err)
	}
	s.committed()
	if s.observer != nil {
		for _, n := range added {
			s.observer.DSNQueued(n.Kind)
		}
		if f.Removed {
			s.observer.Finished(f.Message, finishedOutcome(f.Message))
		}
	}
	if !f.Removed {
		s.rescan() // due again, maybe before the earliest Claim saw
	}
	if wake {
		s.notify()
	}
	return f, nil
}

// pgFinishRemoveSQL deletes a message and its content if its row is
// still exactly as the attempt $2/$3 stored it ($4), and records in its
// history the events $5, that it left at $6, and how ($7).
func (s *PGStore) pgFinishRemoveSQL() string {
	return `WITH m AS (
	DELETE FROM queue_messages WHERE id = $1 AND lease_owner = $2 AND token = $3 AND record = $4 RETURNING id
), b AS (
	DELETE FROM queue_bodies WHERE id IN (SELECT id FROM m)
)` + s.pgLeaveCTEs("$5", "$6", "$7") + pgPostsCTE(8) + `
SELECT count(*) FROM m, (SELECT set_config('synchronous_commit', 'off', true)) AS async`
}

// pgFinishKeepSQL records an outcome that keeps the message, ending the
// lease, if its row is still exactly as the attempt stored it, with the
// events $9 in its history; $8 sends the NOTIFY, for a message due
// already.
var pgFinishKeepSQL = `WITH m AS (
	UPDATE queue_messages SET record = $5, next_attempt = $6, held = $7, lease_owner = NULL, lease_until = NULL, token = NULL
	WHERE id = $1 AND lease_owner = $2 AND token = $3 AND record = $4 RETURNING id
), he AS (
	INSERT INTO queue_history_events (id, event) SELECT m.id, unnest($9::bytea[]) FROM m
	WHERE EXISTS (SELECT 1 FROM queue_history WHERE id = m.id)
)` + pgPostsCTE(10) + `
SELECT count(*) FROM m, (SELECT set_config('synchronous_commit', 'off', true)) AS async
WHERE CASE WHEN $8 THEN pg_notify('` + pgChannel + `', '') IS NOT NULL ELSE true END`

// finishUnchanged is Finish in one statement, for the usual attempt: no
// DSN to store, and the row as the attempt stored it (no hold, retry or
// takeover since), so that the update applied to the attempt's copy is
// the update applied to the stored one. done is false when that does not
// hold: then Finish takes the row lock and reads it again.
//
// Its commit does not wait for the database's disk (synchronous_commit
// off, for this transaction alone): a database that crashes may forget
// the outcomes of its last fraction of a second, and those messages are
// attempted again, as after a crash of the relay during an attempt.
// Every message is still on disk before its 250.
func (s *PGStore) finishUnchanged(ctx context.Context, a Attempt, events []Event, posts []WebhookPost, left time.Time, update func(m *Message) (bool, []DSN)) (f Finished, done bool, err error) {
	if a.stored == nil {
		return Finished{}, false, nil
	}
	m := a.Message
	m.Recipients = slices.Clone(m.Recipients)
	remove, dsns := update(&m)
	if len(dsns) > 0 {
		return Finished{}, false, nil
	}
	evs, err := encodeEvents(events)
	if err != nil {
		return Finished{}, false, err
	}
	wh, err := newPGPosts(posts)
	if err != nil {
		return Finished{}, false, err
	}
	var n int
	if remove {
		err = s.pool.QueryRow(ctx, s.pgFinishRemoveSQL(), append([]any{m.ID, s.owner, int64(a.Token), a.stored, evs, left, string(finishedOutcome(m))}, wh.args()...)...).Scan(&n)
	} else {
		pgTimes(&m)
		var v []byte
		if v, err = encodeRecord(&record{Message: m, Spooled: a.spooled}); err != nil {
			return Finished{}, false, err
		}
		due := !m.Held && !m.NextAttempt.After(pgTime(s.now()))
		err = s.pool.QueryRow(ctx, pgFinishKeepSQL, append([]any{m.ID, s.owner, int64(a.Token), a.stored, v, m.NextAttempt, m.Held, due, evs}, wh.args()...)...).Scan(&n)
		if err == nil && n == 1 {
			s.rescan()
			if due {
				s.notify()
			}
		}
	}
	if err != nil || n == 0 {
		return Finished{}, false, err
	}
	s.committed()
	f = Finished{Message: m, Removed: remove}
	if remove && s.observer != nil {
		s.observer.Finished(m, finishedOutcome(m))
	}
	return f, true, nil
}

// rescanEvery bounds how long Claim trusts what the last scan found when
// nothing said that it changed.
const rescanEvery = 5 * time.Second

// nothingDue tells, without a query, that nothing can be due at now: no
// change since the last scan (by this store, or NOTIFYed by another
// replica), which found nothing due before its Wake, which now is before.
// A scheduler asks Claim every time a worker frees, and most of those
// asks find nothing new.
func (s *PGStore) nothingDue(now time.Time) (Claimed, bool) {
	if s.mustScan.Load() {
		return Claimed{}, false
	}
	s.scanMu.Lock()
	defer s.scanMu.Unlock()
	if time.Since(s.lastScan) > rescanEvery || (!s.lastWake.IsZero() && !now.Before(s.lastWake)) {
		return Claimed{}, false
	}
	return Claimed{Wake: s.lastWake}, true
}

// scanned records what a Claim's scan found; full says it took as many
// as it was asked for, so that more may be due.
func (s *PGStore) scanned(c Claimed, full bool) {
	if full {
		s.rescan()
	}
	s.scanMu.Lock()
	defer s.scanMu.Unlock()
	s.lastWake, s.lastScan = c.Wake, time.Now()
}

// rescan makes the next Claim query the database.
func (s *PGStore) rescan() { s.mustScan.Store(true) }
