package queue_test

import (
	"context"
	"errors"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"smarthost/internal/testpg"
	"smarthost/queue"
)

// TestHistoryNoRetention: with no retention, a message's history lasts
// while it is queued and goes in the commit that takes it out, whether
// delivered or deleted; on both backends.
func TestHistoryNoRetention(t *testing.T) {
	backends := map[string]func(t *testing.T) queue.Backend{
		"bbolt": func(t *testing.T) queue.Backend {
			st, err := queue.Open(filepath.Join(t.TempDir(), "queue.db"), queue.Options{Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			return st
		},
		"postgres": func(t *testing.T) queue.Backend {
			return openPG(t, testpg.Shared(t).NewDatabase(t), queue.PostgresOptions{})
		},
	}
	for name, open := range backends {
		t.Run(name, func(t *testing.T) {
			b := open(t)
			defer b.Close()
			put := func() string {
				m := &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: "a@example.net"}}}
				if err := b.Put(context.Background(), m, []byte("x")); err != nil {
					t.Fatal(err)
				}
				return m.ID
			}
			delivered, deleted := put(), put()
			if h, err := b.History(delivered); err != nil || len(h.Events) != 1 {
				t.Fatalf("history while queued: %+v, %v", h, err)
			}
			c, err := b.Claim(context.Background(), queue.Start{Now: time.Now(), Retry: func(int) time.Time { return time.Now().Add(time.Hour) }}, 10,
				func(id string) bool { return id != delivered })
			if err != nil || len(c.Attempts) != 1 {
				t.Fatalf("claim: %v %v", c, err)
			}
			if _, err := b.Finish(context.Background(), c.Attempts[0], []queue.Event{{At: time.Now(), Type: queue.EventDelivered, Rcpt: "a@example.net"}},
				func(m *queue.Message) (bool, []queue.DSN) {
					m.Recipients[0].State = queue.Delivered
					return true, nil
				}); err != nil {
				t.Fatal(err)
			}
			if err := b.Delete(deleted); err != nil {
				t.Fatal(err)
			}
			for _, id := range []string{delivered, deleted} {
				if _, err := b.History(id); !errors.Is(err, queue.ErrNotFound) {
					t.Errorf("history of %s after it left: %v", id, err)
				}
			}
			if found, err := b.FindHistory(queue.HistoryFilter{To: "a@example.net"}); err != nil || len(found) != 0 {
				t.Errorf("found %v, %v", found, err)
			}
		})
	}
}
