package queue

import (
	"bytes"
	"encoding/binary"
	"os"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// freelistWritten reports whether the current meta page of the bbolt file
// at path points to a freelist, as read from the file: of the two meta
// pages, the valid one with the higher transaction ID.
func freelistWritten(t *testing.T, path string, pageSize int) bool {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	const (
		pageHeader = 16
		magic      = 0xED0CDAED
		noFreelist = ^uint64(0)
	)
	var best struct {
		txid, freelist uint64
		ok             bool
	}
	for i := range 2 {
		m := data[i*pageSize+pageHeader:]
		if binary.LittleEndian.Uint32(m) != magic {
			continue
		}
		// magic, version, page size, flags: 4 bytes each; the root
		// bucket: 16; then freelist, pgid and txid: 8 each.
		freelist, txid := binary.LittleEndian.Uint64(m[32:]), binary.LittleEndian.Uint64(m[48:])
		if !best.ok || txid > best.txid {
			best.txid, best.freelist, best.ok = txid, freelist, true
		}
	}
	if !best.ok {
		t.Fatalf("%s: no valid meta page", path)
	}
	return best.freelist != noFreelist
}

// checkFile runs bbolt's consistency check on the store's file.
func checkFile(t *testing.T, s *Store) {
	t.Helper()
	err := s.db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			t.Errorf("bbolt check: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func allIDs(t *testing.T, s *Store) []string {
	t.Helper()
	var ids []string
	err := s.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(msgsBucket).ForEach(func(k, _ []byte) error {
			ids = append(ids, string(k))
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// A store that held many messages and then lost most of them stops
// writing its long freelist at each commit; a crash then costs a rebuild
// of the list at Open, with nothing lost, and Close writes it again.
func TestFreelistLeftOutWhileMostlyFree(t *testing.T) {
	s, path := openStore(t)
	pageSize := s.db.Info().PageSize
	s.freelistSyncMax = 64
	if err := benchFill(s, 400); err != nil {
		t.Fatal(err)
	}
	put(t, s, newMessage("a@example.net"), "in use")
	if s.db.NoFreelistSync {
		t.Fatal("the freelist of a full store is left out of commits")
	}

	ids := allIDs(t, s)
	benchRemove(t, s, ids[:390])
	kept := ids[390:]
	put(t, s, newMessage("b@example.net"), "drained")
	if !s.db.NoFreelistSync {
		st := s.db.Stats()
		t.Fatalf("with %d free pages, commits still write the freelist", st.FreePageN+st.PendingPageN)
	}

	// A crash: bbolt closes without Store.Close.
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
	if freelistWritten(t, path, pageSize) {
		t.Fatal("the last commit wrote the freelist")
	}
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	s.freelistSyncMax = 64
	checkFile(t, s)
	checkIndex(t, s)
	if n, err := s.Len(); err != nil || n != len(kept)+1 {
		t.Fatalf("Len = %d, %v; want %d", n, err, len(kept)+1)
	}
	for _, id := range kept {
		if body, err := s.Body(id); err != nil || !bytes.Equal(body, benchBody) {
			t.Fatalf("body of %s: %d bytes, %v", id, len(body), err)
		}
	}

	// Still mostly free: left out again, until Close writes it.
	put(t, s, newMessage("c@example.net"), "after the crash")
	if !s.db.NoFreelistSync {
		t.Fatal("after the crash, commits write the long freelist again")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if !freelistWritten(t, path, pageSize) {
		t.Fatal("Close did not write the freelist")
	}
	s, err = Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	checkFile(t, s)
	checkIndex(t, s)
	if n, err := s.Len(); err != nil || n != len(kept)+2 {
		t.Fatalf("Len = %d, %v; want %d", n, err, len(kept)+2)
	}
}

// Close of a store whose commits wrote the freelist commits nothing more,
// and a second Close is harmless.
func TestCloseWritesNothingWhenFreelistWritten(t *testing.T) {
	s, path := openStore(t)
	pageSize := s.db.Info().PageSize
	put(t, s, newMessage("a@example.net"), "x")
	before := s.db.Stats().TxStats
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	after := s.db.Stats().TxStats
	if w := after.GetWrite() - before.GetWrite(); w != 0 {
		t.Errorf("Close wrote %d pages", w)
	}
	if !freelistWritten(t, path, pageSize) {
		t.Error("no freelist in the file")
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}
