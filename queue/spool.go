package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	bolt "go.etcd.io/bbolt"
)

// A large message does not go into bbolt whole: bbolt copies every large
// value into a freshly allocated buffer at commit, and a group commit
// holds all of its messages at once. Its head (the bytes the door kept in
// memory: the header section) is stored in bodiesBucket as usual, and the
// rest in a spool file named by the queue ID in the spool directory,
// <queue file>.spool/. The record says which messages have one (Spooled).
//
// Order of writes, so that a crash at any instant loses no accepted
// message and leaves no record without its file: the file is written
// under a temporary name, fsynced, renamed to the ID, and the directory
// fsynced, before the record is committed; a message leaving the queue
// is committed first and its file removed after. What a crash can leave
// is a file without a record, which Open removes.

// tmpPrefix starts the names of spool files still being written. A queue
// ID never starts with a dot (see validSpoolID).
const tmpPrefix = ".tmp-"

// Spool is the file that receives the part of a large message past its
// head, written in order by one goroutine. Get one from a Backend's
// NewSpool, Write the content, then either hand it to that Backend's
// PutSpooled or Abort it.
type Spool struct {
	dir  string   // the directory the file is made in
	f    *os.File // nil once closed
	name string   // current path; "" once the queue owns the file or it is removed
	size int64
	err  error // the first failure; later writes return it
}

// NewSpool implements Backend: an empty file in the queue's spool
// directory.
func (s *Store) NewSpool() (*Spool, error) {
	f, err := os.CreateTemp(s.spool, tmpPrefix+"*")
	if err != nil {
		return nil, storageError("new spool file", err)
	}
	return &Spool{dir: s.spool, f: f, name: f.Name()}, nil
}

// Write appends p to the file. After a failure (a full disk, say) every
// Write returns the same error: the message cannot be stored.
func (sp *Spool) Write(p []byte) (int, error) {
	if sp.err != nil {
		return 0, sp.err
	}
	if sp.f == nil {
		sp.err = errors.New("queue: spool file already closed")
		return 0, sp.err
	}
	n, err := sp.f.Write(p)
	sp.size += int64(n)
	if err != nil {
		sp.err = storageError("write spool file", err)
		return n, sp.err
	}
	return n, nil
}

// Abort closes and removes the file. It does nothing once PutSpooled has
// stored the message, or after an earlier Abort.
func (sp *Spool) Abort() error {
	if sp.err == nil {
		sp.err = errors.New("queue: spool aborted")
	}
	if sp.f != nil {
		sp.f.Close()
		sp.f = nil
	}
	if sp.name == "" {
		return nil
	}
	name := sp.name
	sp.name = ""
	if err := os.Remove(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("queue: remove spool file: %w", err)
	}
	return nil
}

// PutSpooled implements Backend. It returns only once the file and the
// record are on disk. On any failure it removes the file and returns the
// error, which wraps syscall.ENOSPC when the disk is full.
func (s *Store) PutSpooled(ctx context.Context, m *Message, head []byte, sp *Spool) (err error) {
	defer func() {
		if err != nil {
			sp.Abort()
		}
	}()
	if sp.dir != s.spool {
		return errors.New("queue: put: spool of another store")
	}
	if sp.err != nil {
		return sp.err
	}
	if sp.f == nil {
		return errors.New("queue: put: spool already stored")
	}
	// Checked here too, before the file is synced and renamed.
	if err := checkPut(ctx, m); err != nil {
		return err
	}
	if m.ID == "" {
		m.ID = NewID()
	}
	if !validSpoolID(m.ID) {
		return fmt.Errorf("queue: put: %q cannot name a spool file", m.ID)
	}
	if m.Size == 0 {
		m.Size = int64(len(head)) + sp.size
	}

	if err := sp.place(s.spoolPath(m.ID)); err != nil {
		return err
	}
	if err := s.put(ctx, m, head, true); err != nil {
		return err
	}
	sp.name = "" // the queue owns the file now
	return nil
}

// place makes the written file the file final, in the same directory, on
// disk, as it must be before the record that points to it is committed.
func (sp *Spool) place(final string) error {
	if err := sp.f.Sync(); err != nil {
		return storageError("sync spool file", err)
	}
	if err := sp.f.Close(); err != nil {
		return storageError("close spool file", err)
	}
	sp.f = nil
	// rename replaces an existing file: never the file of another message.
	if _, err := os.Lstat(final); err == nil {
		return fmt.Errorf("queue: put: spool file %s already exists", filepath.Base(final))
	} else if !errors.Is(err, fs.ErrNotExist) {
		return storageError("check spool file", err)
	}
	if err := os.Rename(sp.name, final); err != nil {
		return storageError("rename spool file", err)
	}
	sp.name = final
	if err := syncDir(sp.dir); err != nil {
		return storageError("sync spool directory", err)
	}
	return nil
}

// validSpoolID reports whether id can name a spool file: a plain name that
// is not a temporary one.
func validSpoolID(id string) bool {
	if id == "" || len(id) > 128 {
		return false
	}
	for _, c := range id {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_'
		if !ok {
			return false
		}
	}
	return true
}

func (s *Store) spoolPath(id string) string { return filepath.Join(s.spool, id) }

// spooled reports whether the record of id has a spool file.
func spooled(tx *bolt.Tx, id []byte) bool {
	v := tx.Bucket(msgsBucket).Get(id)
	if v == nil {
		return false
	}
	rec, err := decodeRecord(v)
	return err == nil && rec.Spooled
}

// readSpooled returns head followed by the content of id's spool file, in
// one allocation, for Body. It runs outside any transaction: a file is
// read while the database stays free for the door and the workers.
func (s *Store) readSpooled(id string, head []byte) ([]byte, error) {
	f, err := os.Open(s.spoolPath(id))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	body := make([]byte, len(head)+int(fi.Size()))
	copy(body, head)
	if _, err := io.ReadFull(f, body[len(head):]); err != nil {
		return nil, err
	}
	return body, nil
}

// OpenBody implements Backend: the head that a was claimed with, and a
// spooled message's file, opened once here, by the worker and outside any
// transaction. A file missing or unreadable fails the attempt before any
// upstream is tried; one removed later (the message deleted meanwhile)
// still reads whole.
func (s *Store) OpenBody(a Attempt) (b Body, close func(), err error) {
	head := NewBody(a.head)
	if !a.spooled {
		return head, func() {}, nil
	}
	id := a.Message.ID
	f, err := os.Open(s.spoolPath(id))
	if err != nil {
		return head, func() {}, fmt.Errorf("queue: open spool file of %s: %w", id, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return head, func() {}, fmt.Errorf("queue: open spool file of %s: %w", id, err)
	}
	return Body{head: a.head, rest: io.NewSectionReader(f, 0, fi.Size())}, func() { f.Close() }, nil
}

// Content implements Backend: the head read in a read transaction, and a
// spooled message's file opened after it, as for an attempt.
func (s *Store) Content(id string) (b Body, close func(), err error) {
	s.settle()
	a := Attempt{Message: Message{ID: id}}
	err = s.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(bodiesBucket).Get([]byte(id))
		if v == nil || tx.Bucket(msgsBucket).Get([]byte(id)) == nil {
			return ErrNotFound
		}
		a.head = bytes.Clone(v) // v is only valid inside the transaction
		a.spooled = spooled(tx, []byte(id))
		return nil
	})
	if err != nil {
		return Body{}, func() {}, fmt.Errorf("queue: content of %s: %w", id, err)
	}
	return s.OpenBody(a)
}

// removeSpool removes id's spool file, after the commit that took the
// message out of the queue. A file it fails to remove is removed by the
// next Open.
func (s *Store) removeSpool(id string) {
	if validSpoolID(id) {
		os.Remove(s.spoolPath(id))
	}
}

// cleanSpool removes what a crash can leave in the spool directory:
// temporary files, and files whose message has no record, in bbolt or in
// the journal (not committed, or removed from the queue just before). It reads the directory once and
// looks each name up: O(files).
func (s *Store) cleanSpool() error {
	entries, err := os.ReadDir(s.spool)
	if err != nil {
		return fmt.Errorf("read spool directory: %w", err)
	}
	var orphans []string
	err = s.db.View(func(tx *bolt.Tx) error {
		msgs := tx.Bucket(msgsBucket)
		for _, e := range entries {
			name := e.Name()
			if e.IsDir() {
				continue // not ours
			}
			if strings.HasPrefix(name, tmpPrefix) || msgs.Get([]byte(name)) == nil && !s.journal.holds(name) {
				orphans = append(orphans, name)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, name := range orphans {
		if err := os.Remove(filepath.Join(s.spool, name)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("remove orphaned spool file: %w", err)
		}
	}
	return nil
}

// syncDir fsyncs a directory, so that a rename in it is durable.
func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
