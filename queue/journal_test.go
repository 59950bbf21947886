package queue

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

// crashWithJournaled makes a queue file and its journal as a crash leaves
// them after first was committed and m was answered by Put while no bbolt
// commit could run (an open write transaction holds bbolt's writer lock),
// and returns the copy's path.
func crashWithJournaled(t *testing.T) (first, m *Message, body []byte, crashed string) {
	t.Helper()
	s, path := openStore(t)
	first = newMessage("committed@example.net")
	put(t, s, first, "committed\r\n")
	tx, err := s.db.Begin(true)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback()
	m = newMessage("journaled@example.net")
	body = []byte("Subject: only in the journal\r\n\r\nbody\r\n")
	if err := s.Put(context.Background(), m, body); err != nil {
		t.Fatal(err)
	}
	crashed = filepath.Join(t.TempDir(), "queue.db")
	for _, f := range [][2]string{{path, crashed}, {path + ".journal", crashed + ".journal"}} {
		if err := copyFile(f[0], f[1]); err != nil {
			t.Fatal(err)
		}
	}
	return first, m, body, crashed
}

// TestJournalCrashBeforeCommit: a message answered by Put while no bbolt
// commit could run is in the journal only; a crash then (the files copied
// as they are) loses nothing: Open inserts it, once, with its body and its
// history, due for delivery, and a clean Close empties the journal.
func TestJournalCrashBeforeCommit(t *testing.T) {
	first, m, body, crashed := crashWithJournaled(t)
	s2, err := Open(crashed, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := s2.Body(m.ID); err != nil || !bytes.Equal(got, body) {
		t.Fatalf("body after the crash: %q, %v", got, err)
	}
	h, err := s2.History(m.ID)
	if err != nil || len(h.Events) != 1 || h.Events[0].Type != EventAccepted {
		t.Fatalf("history after the crash: %+v, %v", h, err)
	}
	later := time.Now().Add(time.Hour)
	c, err := s2.Claim(context.Background(), Start{Now: later, Retry: func(int) time.Time { return later }}, 10, nil)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, a := range c.Attempts {
		ids = append(ids, a.Message.ID)
	}
	slices.Sort(ids)
	want := []string{first.ID, m.ID}
	slices.Sort(want)
	if !slices.Equal(ids, want) {
		t.Fatalf("claimed %v after the crash, want %v", ids, want)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(crashed + ".journal"); err != nil || fi.Size() != 0 {
		t.Fatalf("journal after a clean close: %v, %v; want empty", fi, err)
	}
	s3, err := Open(crashed, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s3.Close()
	if n, err := s3.Len(); err != nil || n != 2 {
		t.Errorf("Len after reopening = %d, %v; want 2", n, err)
	}
}

// TestJournalReplaysOnlyWhatBboltLacks: entries up to the sequence number
// bbolt records are not inserted again, by Open or by a salvage, even when
// the file still holds them, as after a crash between a commit and the
// journal's reuse.
func TestJournalReplaysOnlyWhatBboltLacks(t *testing.T) {
	s, path := openStore(t)
	m := newMessage("a@example.net")
	put(t, s, m, "x")
	if err := s.Delete(m.ID); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path + ".journal")
	if err != nil {
		t.Fatal(err)
	}
	if len(data) == 0 {
		t.Fatal("the journal is empty while the store is open")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// The file as it was before Close emptied it: its entry is in bbolt's
	// count, and its message has left the queue.
	if err := os.WriteFile(path+".journal", data, 0o600); err != nil {
		t.Fatal(err)
	}
	sal, err := OpenSalvage(path)
	if err != nil {
		t.Fatal(err)
	}
	dst, err := Open(filepath.Join(t.TempDir(), "new.db"), Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	rep, err := sal.CopyTo(context.Background(), dst)
	sal.Close()
	dst.Close()
	if err != nil || rep.Saved != 0 {
		t.Errorf("salvage saved %+v, %v; the deleted message came back from the journal", rep, err)
	}
	s2, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if n, err := s2.Len(); err != nil || n != 0 {
		t.Errorf("Len = %d, %v; the deleted message came back from the journal", n, err)
	}
}

// TestReadJournalChain: the chain ends at a torn entry, at one whose
// checksum fails, at a gap in the sequence numbers, and at an old entry
// past the tail of entries written again from the start of the file.
func TestReadJournalChain(t *testing.T) {
	entry := func(seq uint64, body string) []byte {
		rec := record{Message: Message{ID: "0000000000000001", From: "a@example.com", Recipients: []Recipient{{Addr: "b@example.net"}}}}
		v, err := encodeRecord(&rec)
		if err != nil {
			t.Fatal(err)
		}
		return appendJournalEntry(nil, &journalEntry{seq: seq, rec: rec, v: v, body: []byte(body)})
	}
	read := func(data []byte) []uint64 {
		var seqs []uint64
		last, end, err := readJournal(bytes.NewReader(data), func(seq uint64, _, body []byte) error {
			seqs = append(seqs, seq)
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(seqs) > 0 && (last != seqs[len(seqs)-1] || end <= 0) {
			t.Errorf("last %d, end %d for %v", last, end, seqs)
		}
		return seqs
	}
	e5, e6, e7 := entry(5, "five"), entry(6, "six!"), entry(7, "seven")
	whole := slices.Concat(e5, e6, e7)
	if got := read(whole); !slices.Equal(got, []uint64{5, 6, 7}) {
		t.Errorf("whole chain: %v", got)
	}
	if got := read(whole[:len(whole)-3]); !slices.Equal(got, []uint64{5, 6}) {
		t.Errorf("torn last entry: %v", got)
	}
	bad := slices.Clone(whole)
	bad[len(e5)+len(e6)-2] ^= 1 // in six's body
	if got := read(bad); !slices.Equal(got, []uint64{5}) {
		t.Errorf("checksum failure: %v", got)
	}
	if got := read(slices.Concat(e5, e6, entry(8, "eight"))); !slices.Equal(got, []uint64{5, 6}) {
		t.Errorf("gap: %v", got)
	}
	// Written again from the start over entries of the same size: the
	// old one after the new tail has an older number.
	rewritten := slices.Concat(entry(8, "8888"), e6, e7)
	if got := read(rewritten); !slices.Equal(got, []uint64{8}) {
		t.Errorf("old entries past a new tail: %v", got)
	}
	if got := read(nil); len(got) != 0 {
		t.Errorf("empty file: %v", got)
	}
}

// TestSalvageTakesTheJournal: salvage and import of a file whose relay
// stopped with a message in the journal only save that message too, and
// not one that the file already holds.
func TestSalvageTakesTheJournal(t *testing.T) {
	first, m, body, crashed := crashWithJournaled(t)
	dst, err := Open(filepath.Join(t.TempDir(), "new.db"), Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	sal, err := OpenSalvage(crashed)
	if err != nil {
		t.Fatal(err)
	}
	defer sal.Close()
	rep, err := sal.CopyTo(context.Background(), dst)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Saved != 2 || rep.Journal != 1 || rep.Held != 0 || len(rep.Lost) > 0 || len(rep.Damage) > 0 || len(rep.Unsure) > 0 {
		t.Errorf("report %+v; want 2 saved, 1 of them from the journal", rep)
	}
	for _, id := range []string{first.ID, m.ID} {
		if _, err := dst.Get(id); err != nil {
			t.Errorf("%s not saved: %v", id, err)
		}
	}
	if got, err := dst.Body(m.ID); err != nil || !bytes.Equal(got, body) {
		t.Errorf("journaled body saved as %q, %v", got, err)
	}
}
