package queue

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"

	bolt "go.etcd.io/bbolt"
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
	c := newCommitter(db)
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
