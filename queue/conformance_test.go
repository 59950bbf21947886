package queue_test

import (
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"smarthost/queue"
	"smarthost/queue/queuetest"
)

// boltStorage is a queue file in a test's temporary directory.
type boltStorage struct{ path string }

func (s boltStorage) Open(t *testing.T, now func() time.Time) queue.Backend {
	t.Helper()
	st, err := queue.Open(s.path, queue.Options{Now: now, Logger: slog.New(slog.DiscardHandler)})
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
