package queue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
)

// pgPosts are posts as the columns of queue_webhooks, for unnest.
type pgPosts struct {
	ids      []string
	at, next []time.Time
	posts    [][]byte
}

func newPGPosts(posts []WebhookPost) (pgPosts, error) {
	var p pgPosts
	for _, w := range posts {
		v, err := json.Marshal(w)
		if err != nil {
			return pgPosts{}, err
		}
		p.ids, p.at, p.next, p.posts = append(p.ids, w.ID), append(p.at, w.At), append(p.next, w.NextTry), append(p.posts, v)
	}
	if p.ids == nil {
		p.ids, p.at, p.next, p.posts = []string{}, []time.Time{}, []time.Time{}, [][]byte{}
	}
	return p, nil
}

// pgPostsCTE stores the posts given as the arrays $n…$n+3, if the CTE m
// returned a row: the change they are about was made.
func pgPostsCTE(n int) string {
	return fmt.Sprintf(`, wh AS (
	INSERT INTO queue_webhooks (id, at, next_try, post)
	SELECT * FROM unnest($%d::text[], $%d::timestamptz[], $%d::timestamptz[], $%d::bytea[]) WHERE EXISTS (SELECT 1 FROM m)
)`, n, n+1, n+2, n+3)
}

func (p pgPosts) args() []any { return []any{p.ids, p.at, p.next, p.posts} }

// insertPosts stores posts in tx.
func insertPosts(ctx context.Context, tx pgx.Tx, posts []WebhookPost) error {
	if len(posts) == 0 {
		return nil
	}
	p, err := newPGPosts(posts)
	if err != nil {
		return err
	}
	_, err = tx.Exec(ctx, `WITH m AS (SELECT 1)`+pgPostsCTE(1)+` SELECT 1`, p.args()...)
	return err
}

// DueWebhooks implements Backend: replicas taking posts at once pass over
// each other's.
func (s *PGStore) DueWebhooks(now time.Time, hold time.Duration, limit int) ([]WebhookPost, error) {
	ctx, cancel := opContext()
	defer cancel()
	rows, err := s.pool.Query(ctx, `WITH d AS (
		SELECT id FROM queue_webhooks WHERE next_try <= $1 ORDER BY next_try LIMIT $2 FOR UPDATE SKIP LOCKED
	)
	UPDATE queue_webhooks w SET next_try = $3 FROM d WHERE w.id = d.id RETURNING w.post`, pgTime(now), limit, pgTime(now.Add(hold)))
	if err != nil {
		return nil, s.pgError(ctx, "take webhook posts", err)
	}
	var (
		out []WebhookPost
		v   []byte
	)
	_, err = pgx.ForEachRow(rows, []any{&v}, func() error {
		var p WebhookPost
		if err := json.Unmarshal(v, &p); err != nil {
			return err
		}
		out = append(out, p)
		return nil
	})
	if err != nil {
		return nil, s.pgError(ctx, "take webhook posts", err)
	}
	// Oldest due first; RETURNING keeps no order.
	slices.SortStableFunc(out, func(a, b WebhookPost) int { return a.NextTry.Compare(b.NextTry) })
	return out, nil
}

// WebhookDone implements Backend.
func (s *PGStore) WebhookDone(id string) error {
	ctx, cancel := opContext()
	defer cancel()
	if _, err := s.pool.Exec(ctx, `DELETE FROM queue_webhooks WHERE id = $1`, id); err != nil {
		return s.pgError(ctx, "webhook post "+id+" done", err)
	}
	return nil
}

// WebhookRetry implements Backend: the stored post's tries and due time
// change with its column.
func (s *PGStore) WebhookRetry(id string, next time.Time) error {
	ctx, cancel := opContext()
	defer cancel()
	err := pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		var v []byte
		err := tx.QueryRow(ctx, `SELECT post FROM queue_webhooks WHERE id = $1 FOR UPDATE`, id).Scan(&v)
		if errors.Is(err, pgx.ErrNoRows) {
			return nil // gone: taken meanwhile
		}
		if err != nil {
			return err
		}
		var p WebhookPost
		if err := json.Unmarshal(v, &p); err != nil {
			return err
		}
		p.Tries++
		p.NextTry = pgTime(next)
		if v, err = json.Marshal(p); err != nil {
			return err
		}
		_, err = tx.Exec(ctx, `UPDATE queue_webhooks SET post = $2, next_try = $3 WHERE id = $1`, id, v, p.NextTry)
		return err
	})
	if err != nil {
		return s.pgError(ctx, "webhook post "+id+" retry", err)
	}
	return nil
}

// WebhookBacklog implements Backend.
func (s *PGStore) WebhookBacklog() (n int, oldest time.Time, err error) {
	ctx, cancel := opContext()
	defer cancel()
	var at *time.Time
	if err := s.pool.QueryRow(ctx, `SELECT count(*), min(at) FROM queue_webhooks`).Scan(&n, &at); err != nil {
		return 0, time.Time{}, fmt.Errorf("queue: webhook backlog: %w", err)
	}
	if at != nil {
		oldest = *at
	}
	return n, oldest, nil
}
