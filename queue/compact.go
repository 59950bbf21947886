package queue

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"

	bolt "go.etcd.io/bbolt"
)

// bbolt never shrinks its file. After a backlog drains, the file keeps
// its size as free pages, and bbolt keeps every free page in a map: a
// queue of a thousand messages in a file that once held a million costs
// some 60 MB of memory and a fifth of a second at each Open. So Open
// rewrites such a file into a new one that holds only the pages in use.

// compactSuffix names the new file while it is written, beside the queue
// file. One left by a crash is removed at the next Open.
const compactSuffix = ".compact"

// compactMaxUsed bounds what Open copies to compact a file: 65536 pages
// in use, 256 MiB with 4 KiB pages, a few seconds of writing at most.
// Larger files are left as they are; their free pages still cost no
// writes at each commit (chooseFreelistSync).
const compactMaxUsed = 1 << 16

// compactTxSize is how much bbolt.Compact copies per transaction.
const compactTxSize = 64 << 20

// compactDrained compacts the file at path, open as db with opts, when
// more of it is free than in use, its free pages are more than
// freelistSyncMax, and the pages in use at most compactMaxUsed. It
// returns the database to use from then on: the compacted one, or db if
// there was nothing to do or compacting failed (which it logs: the
// queue works as well uncompacted). The new file is complete and on disk
// before it replaces the old one, and the rename is on disk before
// anything is committed to it, so a crash at any point leaves one of the
// two whole. An error means neither can be used safely now; both are
// closed.
func compactDrained(db *bolt.DB, path string, opts *bolt.Options, freelistSyncMax int, log *slog.Logger) (*bolt.DB, error) {
	tmp := path + compactSuffix
	// Only the process holding the lock on path may write tmp: remove
	// what a crash left.
	if err := os.Remove(tmp); err != nil && !errors.Is(err, fs.ErrNotExist) {
		log.Warn("queue: cannot remove an unfinished compacted file", "path", tmp, "err", err)
	}
	var total int
	if err := db.View(func(tx *bolt.Tx) error {
		total = int(tx.Size() / int64(db.Info().PageSize))
		return nil
	}); err != nil {
		db.Close()
		return nil, err
	}
	pageSize := db.Info().PageSize
	st := db.Stats()
	free := st.FreePageN + st.PendingPageN
	used := total - free
	if free <= freelistSyncMax || free <= used || used > compactMaxUsed {
		return db, nil
	}

	dst, err := bolt.Open(tmp, 0o600, opts)
	if err == nil {
		// Each of Compact's transactions is fsynced as it commits.
		err = bolt.Compact(dst, db, compactTxSize)
		if err != nil {
			dst.Close()
		}
	}
	if err == nil {
		err = os.Rename(tmp, path)
		if err != nil {
			dst.Close()
		}
	}
	if err != nil {
		os.Remove(tmp)
		log.Warn("queue: compacting the queue file failed; it stays as it is",
			"path", path, "pages_in_use", used, "pages_free", free, "err", err)
		return db, nil
	}
	// From here on, path is the new file, which dst has open and locked.
	db.Close()
	if err := syncDir(filepath.Dir(path)); err != nil {
		dst.Close()
		return nil, fmt.Errorf("compact: sync directory of %s: %w", path, err)
	}
	log.Info("queue: compacted the queue file, which a drained backlog had left mostly free",
		"path", path, "pages_before", total, "pages_in_use", used, "page_size", pageSize)
	return dst, nil
}
