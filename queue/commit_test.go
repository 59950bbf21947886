package queue

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"smarthost/internal/testwait"
)

func openCommitter(t *testing.T) (*bolt.DB, *committer) {
	t.Helper()
	db, err := bolt.Open(filepath.Join(t.TempDir(), "c.db"), 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Update(func(tx *bolt.Tx) error { _, err := tx.CreateBucket([]byte("b")); return err }); err != nil {
		t.Fatal(err)
	}
	c := newCommitter(db, nil, nil)
	t.Cleanup(func() { c.close(); db.Close() })
	return db, c
}

// TestCommitterIsolatesFailures: writers in one group keep their writes
// when another fails or panics, and the failing one gets its own error.
func TestCommitterIsolatesFailures(t *testing.T) {
	db, c := openCommitter(t)
	errMine := errors.New("mine")
	const n = 200
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Go(func() {
			key := fmt.Appendf(nil, "k%03d", i)
			write := c.write
			if i%3 == 0 {
				write = c.writeLazy
			}
			errs[i] = write(func(tx *bolt.Tx) error {
				if err := tx.Bucket([]byte("b")).Put(key, key); err != nil {
					return err
				}
				switch i % 50 {
				case 7:
					return errMine
				case 11:
					panic("writer bug")
				}
				return nil
			})
		})
	}
	wg.Wait()
	err := db.View(func(tx *bolt.Tx) error {
		b := tx.Bucket([]byte("b"))
		for i := range n {
			key := fmt.Appendf(nil, "k%03d", i)
			stored := b.Get(key) != nil
			switch i % 50 {
			case 7:
				if !errors.Is(errs[i], errMine) || stored {
					t.Errorf("writer %d: err %v, stored %v; want its own error and nothing stored", i, errs[i], stored)
				}
			case 11:
				if errs[i] == nil || stored {
					t.Errorf("writer %d: err %v, stored %v; want the panic as an error and nothing stored", i, errs[i], stored)
				}
			default:
				if errs[i] != nil || !stored {
					t.Errorf("writer %d: err %v, stored %v", i, errs[i], stored)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestCommitterClosed(t *testing.T) {
	_, c := openCommitter(t)
	if err := c.write(func(*bolt.Tx) error { return nil }); err != nil {
		t.Fatal(err)
	}
	c.close()
	c.close() // twice is harmless
	if err := c.write(func(*bolt.Tx) error { return nil }); !errors.Is(err, ErrClosed) {
		t.Fatalf("write after close: %v, want ErrClosed", err)
	}
}

// TestWritableRecovers: a commit that fails makes the store not writable,
// a writer's own error does not, and with no write to try, the store's
// probe finds by itself when writing works again. The failure is the
// kernel's: a file size limit (RLIMIT_FSIZE, which binds root too) below
// the pages the commit writes. It is the whole process's limit, so this
// test must not run in parallel with others that write files.
func TestWritableRecovers(t *testing.T) {
	s, _ := openStore(t)
	put(t, s, newMessage("a@example.net"), "before")
	if err := s.Delete("0000000000000000"); !errors.Is(err, ErrNotFound) || !s.Writable() {
		t.Fatalf("Delete of a missing ID: %v, writable %v: a writer's error is not the storage's", err, s.Writable())
	}

	var limit syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_FSIZE, &limit); err != nil {
		t.Fatal(err)
	}
	restore := sync.OnceFunc(func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &limit); err != nil {
			t.Errorf("restore the file size limit: %v", err)
		}
	})
	defer restore()
	low := limit
	low.Cur = 8192 // the two meta pages, no more
	if err := syscall.Setrlimit(syscall.RLIMIT_FSIZE, &low); err != nil {
		t.Fatal(err)
	}
	// The first Put may still be taken by the journal, whose file is
	// small; the commit that follows it fails, and Puts from then on
	// commit themselves and fail.
	b := newMessage("b@example.net")
	bErr := s.Put(context.Background(), b, []byte("while failing"))
	if bErr != nil && !errors.Is(bErr, syscall.EFBIG) {
		t.Fatalf("Put past the limit: %v, want nil (journaled) or EFBIG", bErr)
	}
	testwait.For(t, 10*time.Second, "the store to find it cannot commit", func() bool { return !s.Writable() })
	err := s.Put(context.Background(), newMessage("d@example.net"), []byte("while failing"))
	if !errors.Is(err, syscall.EFBIG) || s.Writable() {
		t.Fatalf("Put past the limit: %v, writable %v; want EFBIG and not writable", err, s.Writable())
	}
	// The probe fails too, as long as the limit holds.
	for deadline := time.Now().Add(2500 * time.Millisecond); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if s.Writable() {
			t.Fatal("writable again while writes still fail")
		}
	}
	restore()
	testwait.For(t, 10*time.Second, "the probe to find the file writable", s.Writable)
	if bErr != nil {
		b.ID = ""
		put(t, s, b, "again")
	}
	put(t, s, newMessage("c@example.net"), "after")
	if n, err := s.Len(); err != nil || n != 3 {
		t.Errorf("Len = %d, %v; want 3: a, b (journaled, or refused and put again) and c", n, err)
	}
}
