package queue_test

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"smarthost/internal/testpg"
	"smarthost/queue"
	"smarthost/queue/queuetest"
)

// TestMain stops the PostgreSQL server that the tests share, once they
// have run.
func TestMain(m *testing.M) { testpg.Main(m) }

// boltStorage is a queue file in a test's temporary directory.
type boltStorage struct{ path string }

func (s boltStorage) Open(t *testing.T, now func() time.Time) queue.Backend {
	t.Helper()
	st, err := queue.Open(s.path, queue.Options{Now: now, Logger: slog.New(slog.DiscardHandler), HistoryRetention: queuetest.HistoryRetention, Webhooks: queuetest.Subscriptions})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func (s boltStorage) Damage(t *testing.T, id string) {
	t.Helper()
	if err := queue.DamageRecord(s.path, id); err != nil {
		t.Fatal(err)
	}
}

// TestConformance runs the backend conformance suite on the bbolt Store,
// with real files.
func TestConformance(t *testing.T) {
	queuetest.Run(t, func(t *testing.T) queuetest.Storage {
		return boltStorage{path: filepath.Join(t.TempDir(), "queue.db")}
	})
}

// pgStorage is a database of its own on the shared test server.
type pgStorage struct{ dsn string }

func (s pgStorage) Open(t *testing.T, now func() time.Time) queue.Backend {
	t.Helper()
	st, err := queue.OpenPostgres(context.Background(), s.dsn, queue.PostgresOptions{Now: now, Logger: slog.New(slog.DiscardHandler), HistoryRetention: queuetest.HistoryRetention, Webhooks: queuetest.Subscriptions})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// Damage overwrites the record with the start of one that ends short, as
// the bbolt storage does.
func (s pgStorage) Damage(t *testing.T, id string) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, s.dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	tag, err := conn.Exec(ctx, `UPDATE queue_messages SET record = $2 WHERE id = $1`, id, []byte{1, '{'})
	if err != nil || tag.RowsAffected() != 1 {
		t.Fatalf("damaging %s: %v, %d rows", id, err, tag.RowsAffected())
	}
}

// TestConformancePostgres runs the backend conformance suite on the
// PostgreSQL store, each test on a new database of a real server.
func TestConformancePostgres(t *testing.T) {
	t.Parallel()
	queuetest.Run(t, func(t *testing.T) queuetest.Storage {
		return pgStorage{dsn: testpg.Shared(t).NewDatabase(t)}
	})
}
