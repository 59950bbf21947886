package queue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgHistoryArgs are the columns of a new message's history row, its
// recipients as looked up, and its acceptance event, for pgInsertSQL.
type pgHistoryArgs struct {
	head                    []byte
	sender, user, messageID string
	rcpts                   []string
	accepted                []byte
}

func newPGHistoryArgs(m *Message) (pgHistoryArgs, error) {
	h := newHistory(m)
	accepted, err := json.Marshal(h.Events[0])
	if err != nil {
		return pgHistoryArgs{}, err
	}
	h.Events = nil
	head, err := json.Marshal(h)
	if err != nil {
		return pgHistoryArgs{}, err
	}
	a := pgHistoryArgs{head: head, sender: strings.ToLower(h.From), user: h.User, messageID: normMessageID(h.MessageID), accepted: accepted}
	for _, k := range h.keys() {
		if k[0] == "t" {
			a.rcpts = append(a.rcpts, k[1])
		}
	}
	return a, nil
}

// encodeEvents is events as queue_history_events stores them.
func encodeEvents(events []Event) ([][]byte, error) {
	out := make([][]byte, len(events))
	for i, ev := range events {
		v, err := json.Marshal(ev)
		if err != nil {
			return nil, err
		}
		out[i] = v
	}
	return out, nil
}

// pgLeaveCTEs are the parts of a statement, after a CTE m that returns the
// id of a message leaving the queue, that record its events ($events),
// when it left ($left) and how ($outcome) in its history; with no
// retention they remove the history instead.
func (s *PGStore) pgLeaveCTEs(events, left, outcome string) string {
	if s.historyRetention <= 0 {
		return `, hd AS (DELETE FROM queue_history WHERE id IN (SELECT id FROM m))
, hr AS (DELETE FROM queue_history_rcpts WHERE id IN (SELECT id FROM m))
, he AS (DELETE FROM queue_history_events WHERE id IN (SELECT id FROM m))
, hx AS (SELECT ` + events + `::bytea[], ` + left + `::timestamptz, ` + outcome + `::text)`
	}
	return `, he AS (INSERT INTO queue_history_events (id, event) SELECT m.id, unnest(` + events + `::bytea[]) FROM m)
, hl AS (UPDATE queue_history SET left_at = ` + left + `, outcome = ` + outcome + ` WHERE id IN (SELECT id FROM m))`
}

// addHistory appends events to the history of id, in tx.
func (s *PGStore) addHistory(ctx context.Context, tx pgx.Tx, id string, events []Event) error {
	if len(events) == 0 {
		return nil
	}
	evs, err := encodeEvents(events)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, `INSERT INTO queue_history_events (id, event)
		SELECT $1, unnest($2::bytea[]) WHERE EXISTS (SELECT 1 FROM queue_history WHERE id = $1)`, id, evs)
	return err
}

// leaveHistory records, in tx, that id left the queue.
func (s *PGStore) leaveHistory(ctx context.Context, tx pgx.Tx, id string, left time.Time, outcome Outcome, events []Event) error {
	evs, err := encodeEvents(events)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, `WITH m AS (SELECT id FROM queue_history WHERE id = $1)`+s.pgLeaveCTEs("$2", "$3", "$4")+` SELECT 1`,
		id, evs, left, string(outcome))
	return err
}

// History implements Backend.
func (s *PGStore) History(id string) (*History, error) {
	ctx, cancel := opContext()
	defer cancel()
	var (
		head    []byte
		left    *time.Time
		outcome string
	)
	err := s.pool.QueryRow(ctx, `SELECT head, left_at, outcome FROM queue_history WHERE id = $1`, id).Scan(&head, &left, &outcome)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, fmt.Errorf("queue: history of %s: %w", id, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("queue: history of %s: %w", id, err)
	}
	var h History
	if err := json.Unmarshal(head, &h); err != nil {
		return nil, fmt.Errorf("queue: history of %s: %w", id, err)
	}
	if left != nil {
		h.Left, h.Outcome = *left, Outcome(outcome)
	}
	rows, err := s.pool.Query(ctx, `SELECT event FROM queue_history_events WHERE id = $1 ORDER BY seq`, id)
	if err != nil {
		return nil, fmt.Errorf("queue: history of %s: %w", id, err)
	}
	var v []byte
	_, err = pgx.ForEachRow(rows, []any{&v}, func() error {
		var ev Event
		if err := json.Unmarshal(v, &ev); err != nil {
			return err
		}
		h.Events = append(h.Events, ev)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("queue: history of %s: %w", id, err)
	}
	return &h, nil
}

// FindHistory implements Backend: one query, which the indexes answer.
func (s *PGStore) FindHistory(f HistoryFilter) ([]History, error) {
	ctx, cancel := opContext()
	defer cancel()
	var (
		where []string
		args  []any
	)
	arg := func(v any) string {
		args = append(args, v)
		return "$" + strconv.Itoa(len(args))
	}
	from := "queue_history h"
	if f.To != "" {
		from += " JOIN queue_history_rcpts r ON r.id = h.id AND r.received = h.received AND r.rcpt = " + arg(strings.ToLower(f.To))
	}
	if f.From != "" {
		where = append(where, "h.sender = "+arg(strings.ToLower(f.From)))
	}
	if f.User != "" {
		where = append(where, "h.username = "+arg(f.User))
	}
	if f.MessageID != "" {
		where = append(where, "h.msg_id = "+arg(normMessageID(f.MessageID)))
	}
	if !f.Since.IsZero() {
		where = append(where, "h.received >= "+arg(f.Since))
	}
	if !f.Until.IsZero() {
		where = append(where, "h.received <= "+arg(f.Until))
	}
	q := "SELECT h.head, h.left_at, h.outcome FROM " + from
	if len(where) > 0 {
		q += " WHERE " + strings.Join(where, " AND ")
	}
	q += " ORDER BY h.received DESC, h.id DESC LIMIT " + arg(f.limit())
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("queue: find history: %w", err)
	}
	var (
		out     []History
		head    []byte
		left    *time.Time
		outcome string
	)
	_, err = pgx.ForEachRow(rows, []any{&head, &left, &outcome}, func() error {
		var h History
		if err := json.Unmarshal(head, &h); err != nil {
			return err
		}
		if left != nil {
			h.Left, h.Outcome = *left, Outcome(outcome)
		}
		out = append(out, h)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("queue: find history: %w", err)
	}
	return out, nil
}

// PruneHistory implements Backend: one statement, the oldest first;
// replicas pruning at once pass over each other's rows.
func (s *PGStore) PruneHistory(before time.Time, max int) (int, error) {
	ctx, cancel := opContext()
	defer cancel()
	var n int
	err := s.pool.QueryRow(ctx, `WITH p AS (
		SELECT id FROM queue_history WHERE left_at < $1 ORDER BY left_at LIMIT $2 FOR UPDATE SKIP LOCKED
	), e AS (
		DELETE FROM queue_history_events WHERE id IN (SELECT id FROM p)
	), r AS (
		DELETE FROM queue_history_rcpts WHERE id IN (SELECT id FROM p)
	), h AS (
		DELETE FROM queue_history WHERE id IN (SELECT id FROM p) RETURNING id
	)
	SELECT count(*) FROM h`, before, max).Scan(&n)
	if err != nil {
		return 0, s.pgError(ctx, "prune history", err)
	}
	return n, nil
}
