package queue

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
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

// Open compacts a file that a drained backlog left mostly free, keeping
// every message, claim and index entry, and removes what an interrupted
// compaction left.
func TestOpenCompactsDrainedFile(t *testing.T) {
	s, path := openStore(t)
	if err := benchFill(s, 400); err != nil {
		t.Fatal(err)
	}
	ids := allIDs(t, s)
	benchRemove(t, s, ids[:390])
	claimed := benchClaim(t, benchScheduler(s), 2) // interrupted deliveries
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path+compactSuffix, []byte("left by a crash"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := fileSize(t, path)

	var logs syncBuffer
	opts := Options{freelistSyncMax: 64, Logger: slog.New(slog.NewTextHandler(&logs, nil))}
	s, err := Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	after := fileSize(t, path)
	if after*4 > before {
		t.Errorf("file of %d bytes compacted to %d, want a quarter or less", before, after)
	}
	if !strings.Contains(logs.String(), "compacted the queue file") {
		t.Errorf("log: %q, want a line about the compaction", logs.String())
	}
	if _, err := os.Stat(path + compactSuffix); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s: %v, want it removed", path+compactSuffix, err)
	}
	checkFile(t, s)
	checkIndex(t, s)
	if got := s.Recovered(); got != len(claimed) {
		t.Errorf("Recovered = %d, want %d", got, len(claimed))
	}
	if n, err := s.Len(); err != nil || n != 10 {
		t.Fatalf("Len = %d, %v; want 10", n, err)
	}
	for _, id := range ids[390:] {
		if body, err := s.Body(id); err != nil || !bytes.Equal(body, benchBody) {
			t.Fatalf("body of %s: %d bytes, %v", id, len(body), err)
		}
	}
	if got, err := s.Stats(); err != nil || !sameStats(got, scanStats(t, s)) {
		t.Errorf("Stats = %+v, %v; the records say %+v", got, err, scanStats(t, s))
	}
	// The new file takes writes and opens again, with nothing to compact.
	put(t, s, newMessage("a@example.net"), "after")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	var logs2 syncBuffer
	opts.Logger = slog.New(slog.NewTextHandler(&logs2, nil))
	s, err = Open(path, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if strings.Contains(logs2.String(), "compact") {
		t.Errorf("second Open: %q, want no compaction", logs2.String())
	}
	if n, err := s.Len(); err != nil || n != 11 {
		t.Fatalf("Len = %d, %v; want 11", n, err)
	}
}

// When the compacted file cannot be written, Open keeps the file as it is
// and says why.
func TestOpenCompactionFails(t *testing.T) {
	s, path := openStore(t)
	if err := benchFill(s, 400); err != nil {
		t.Fatal(err)
	}
	benchRemove(t, s, allIDs(t, s)[:390])
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// A directory, not empty, where the new file would go.
	if err := os.MkdirAll(filepath.Join(path+compactSuffix, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	before := fileSize(t, path)
	var logs syncBuffer
	s, err := Open(path, Options{freelistSyncMax: 64, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if !strings.Contains(logs.String(), "compacting the queue file failed") {
		t.Errorf("log: %q, want the failure", logs.String())
	}
	if after := fileSize(t, path); after != before {
		t.Errorf("file size %d, want %d: unchanged", after, before)
	}
	checkIndex(t, s)
	if n, err := s.Len(); err != nil || n != 10 {
		t.Fatalf("Len = %d, %v; want 10", n, err)
	}
}

func fileSize(t testing.TB, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}
