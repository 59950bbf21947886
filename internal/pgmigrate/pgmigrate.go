// Package pgmigrate creates and migrates tables in a PostgreSQL database
// that several smarthost processes share, safely when they start at once.
// Each component (the queue, the upstreams' shared state) owns its tables
// and its list of steps; the database records how many of each it has run.
package pgmigrate

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// lockKey is the transaction-level advisory lock that serialises
// migrations across processes.
const lockKey = 0x736d74686f7374 // "smthost"

// Beginner starts a transaction: a *pgx.Conn or a *pgxpool.Pool.
type Beginner interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// Apply runs the steps of component that the database has not run yet,
// in order, in one transaction under an advisory lock, and records them.
// A database whose component has run more steps than given was migrated
// by a newer smarthost; Apply refuses it and changes nothing.
func Apply(ctx context.Context, db Beginner, component string, steps []string) error {
	tx, err := db.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx)
	if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock($1)", int64(lockKey)); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `CREATE TABLE IF NOT EXISTS smarthost_schema (
		component text PRIMARY KEY,
		version   integer NOT NULL
	)`); err != nil {
		return err
	}
	var version int
	err = tx.QueryRow(ctx, "SELECT version FROM smarthost_schema WHERE component = $1", component).Scan(&version)
	if err != nil && err != pgx.ErrNoRows {
		return err
	}
	if version > len(steps) {
		return fmt.Errorf("the database's %s schema is version %d, newer than this smarthost knows (%d): run a newer smarthost", component, version, len(steps))
	}
	if version == len(steps) {
		return nil
	}
	for i := version; i < len(steps); i++ {
		if _, err := tx.Exec(ctx, steps[i]); err != nil {
			return fmt.Errorf("%s schema step %d: %w", component, i+1, err)
		}
	}
	if _, err := tx.Exec(ctx, `INSERT INTO smarthost_schema (component, version) VALUES ($1, $2)
		ON CONFLICT (component) DO UPDATE SET version = EXCLUDED.version`, component, len(steps)); err != nil {
		return err
	}
	return tx.Commit(ctx)
}
