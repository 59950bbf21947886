package pgmigrate

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"smarthost/internal/testpg"
)

func TestMain(m *testing.M) { testpg.Main(m) }

func pool(t *testing.T) *pgxpool.Pool {
	t.Helper()
	p, err := pgxpool.New(context.Background(), testpg.Shared(t).NewDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

var steps = []string{
	"CREATE TABLE a (x int)",
	"INSERT INTO a VALUES (1)",
	"ALTER TABLE a ADD COLUMN y int",
}

func count(t *testing.T, p *pgxpool.Pool) int {
	t.Helper()
	var n int
	if err := p.QueryRow(context.Background(), "SELECT count(*) FROM a").Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestApplyConcurrent: ten processes' worth of connections migrating at
// once run each step exactly once.
func TestApplyConcurrent(t *testing.T) {
	p := pool(t)
	var wg sync.WaitGroup
	errs := make(chan error, 10)
	for range 10 {
		wg.Go(func() { errs <- Apply(context.Background(), p, "test", steps) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := count(t, p); n != 1 {
		t.Fatalf("%d rows, want 1: a step ran more than once", n)
	}
}

// TestApplyLaterSteps: a second Apply with more steps runs only the new
// ones; components are counted apart.
func TestApplyLaterSteps(t *testing.T) {
	p := pool(t)
	ctx := context.Background()
	if err := Apply(ctx, p, "test", steps[:2]); err != nil {
		t.Fatal(err)
	}
	if err := Apply(ctx, p, "test", steps); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Exec(ctx, "INSERT INTO a (x, y) VALUES (2, 2)"); err != nil {
		t.Fatal(err)
	}
	if n := count(t, p); n != 2 {
		t.Fatalf("%d rows, want 2", n)
	}
	if err := Apply(ctx, p, "other", []string{"CREATE TABLE b (x int)"}); err != nil {
		t.Fatal(err)
	}
}

// TestApplyRefusesNewerSchema: a binary that knows fewer steps than the
// database has run changes nothing.
func TestApplyRefusesNewerSchema(t *testing.T) {
	p := pool(t)
	ctx := context.Background()
	if err := Apply(ctx, p, "test", steps); err != nil {
		t.Fatal(err)
	}
	err := Apply(ctx, p, "test", steps[:2])
	if err == nil || !strings.Contains(err.Error(), "newer") {
		t.Fatalf("older steps on a newer schema: %v, want a refusal", err)
	}
	var v int
	if err := p.QueryRow(ctx, "SELECT version FROM smarthost_schema WHERE component = 'test'").Scan(&v); err != nil || v != 3 {
		t.Fatalf("version %d, %v; want 3 unchanged", v, err)
	}
}

// TestApplyAllOrNothing: a failing step leaves the earlier ones of the
// same Apply undone, so that the next start retries them all.
func TestApplyAllOrNothing(t *testing.T) {
	p := pool(t)
	ctx := context.Background()
	if err := Apply(ctx, p, "test", []string{"CREATE TABLE a (x int)", "NOT SQL"}); err == nil {
		t.Fatal("a bad step passed")
	}
	var exists bool
	if err := p.QueryRow(ctx, "SELECT to_regclass('a') IS NOT NULL").Scan(&exists); err != nil || exists {
		t.Fatalf("table a exists=%v (%v) after a failed migration", exists, err)
	}
}
