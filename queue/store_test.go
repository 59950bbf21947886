package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// openStore opens a fresh store in a directory that does not exist yet.
func openStore(t testing.TB) (*Store, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "spool", "queue.db")
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s, path
}

func reopen(t *testing.T, s *Store, path string) *Store {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s2, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s2.Close() })
	return s2
}

func newMessage(rcpts ...string) *Message {
	m := &Message{From: "app@example.com", User: "billing-app", MessageID: "<m1@example.com>"}
	for _, r := range rcpts {
		m.Recipients = append(m.Recipients, Recipient{Addr: r})
	}
	return m
}

func put(t testing.TB, s *Store, m *Message, body string) {
	t.Helper()
	if err := s.Put(context.Background(), m, []byte(body)); err != nil {
		t.Fatal(err)
	}
	// Tests that read the file itself see the message there, as every
	// read through the Store does.
	s.settle()
}

func TestPutGetBody(t *testing.T) {
	s, path := openStore(t)
	body := []byte("Subject: hi\r\n\r\n\x00binary\xff\r\n.\r\n")
	m := newMessage("a@example.net", "b@example.net")
	m.Recipients[1].State = Failed // Put resets every recipient to Pending
	before := time.Now()
	if err := s.Put(context.Background(), m, body); err != nil {
		t.Fatal(err)
	}
	if len(m.ID) != 16 || strings.Trim(m.ID, "0123456789abcdef") != "" {
		t.Errorf("ID = %q, want 16 lowercase hex characters", m.ID)
	}
	if m.Received.Before(before) || !m.NextAttempt.Equal(m.Received) {
		t.Errorf("Received %v, NextAttempt %v: want now, and due at once", m.Received, m.NextAttempt)
	}
	if m.Size != int64(len(body)) {
		t.Errorf("Size = %d, want %d", m.Size, len(body))
	}

	got, err := s.Get(m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != m.ID || got.From != m.From || got.User != m.User || got.MessageID != m.MessageID ||
		!got.Received.Equal(m.Received) || !got.NextAttempt.Equal(m.NextAttempt) || got.Size != m.Size {
		t.Errorf("Get = %+v, want %+v", got, m)
	}
	if p := got.Pending(); len(p) != 2 || p[0] != "a@example.net" || p[1] != "b@example.net" {
		t.Errorf("Pending = %q", p)
	}
	b, err := s.Body(m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, body) {
		t.Errorf("Body = %q, want %q", b, body)
	}
	if n, err := s.Len(); err != nil || n != 1 {
		t.Errorf("Len = %d, %v; want 1", n, err)
	}

	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("file mode %v, want 0600", fi.Mode().Perm())
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o700 {
		t.Errorf("directory mode %v, want 0700", di.Mode().Perm())
	}
}

func TestGetNotFound(t *testing.T) {
	s, _ := openStore(t)
	if _, err := s.Get("0123456789abcdef"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get: %v, want ErrNotFound", err)
	}
	if _, err := s.Body("0123456789abcdef"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Body: %v, want ErrNotFound", err)
	}
}

func TestPutRejects(t *testing.T) {
	s, _ := openStore(t)
	if err := s.Put(context.Background(), newMessage(), []byte("x")); err == nil {
		t.Error("Put without recipients succeeded")
	}
	m := newMessage("a@example.net")
	put(t, s, m, "first")
	dup := newMessage("b@example.net")
	dup.ID = m.ID
	if err := s.Put(context.Background(), dup, []byte("second")); err == nil {
		t.Error("Put with an existing ID succeeded")
	}
	if b, _ := s.Body(m.ID); string(b) != "first" {
		t.Errorf("Body after duplicate Put = %q, want the first", b)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Put(ctx, newMessage("a@example.net"), nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Put with cancelled ctx: %v", err)
	}
}

func TestReopen(t *testing.T) {
	s, path := openStore(t)
	m := newMessage("a@example.net")
	put(t, s, m, "hello\r\n")
	s = reopen(t, s, path)
	got, err := s.Get(m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Received.Equal(m.Received) || got.Recipients[0].Addr != "a@example.net" {
		t.Errorf("after reopen Get = %+v", got)
	}
	if b, err := s.Body(m.ID); err != nil || string(b) != "hello\r\n" {
		t.Errorf("after reopen Body = %q, %v", b, err)
	}
	if s.Recovered() != 0 {
		t.Errorf("Recovered = %d, want 0", s.Recovered())
	}
}

func TestOpenLocked(t *testing.T) {
	_, path := openStore(t)
	start := time.Now()
	s2, err := Open(path, Options{LockTimeout: 100 * time.Millisecond})
	if err == nil {
		s2.Close()
		t.Fatal("second Open of a locked file succeeded")
	}
	if !errors.Is(err, ErrLocked) || !strings.Contains(err.Error(), path+" is locked by another process") {
		t.Errorf("err = %v, want the lock error naming the file", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("second Open took %v, want it to fail fast", d)
	}
}

func TestOpenBadPath(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// A regular file where the directory should be.
	if _, err := Open(filepath.Join(file, "queue.db"), Options{}); err == nil {
		t.Error("Open below a regular file succeeded")
	}
	// Not a bbolt file.
	junk := filepath.Join(dir, "junk.db")
	if err := os.WriteFile(junk, bytes.Repeat([]byte("junk"), 4096), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(junk, Options{}); err == nil {
		t.Error("Open of a junk file succeeded")
	}
}

func TestConcurrentPut(t *testing.T) {
	s, _ := openStore(t)
	const goroutines, each = 20, 10
	ids := make(chan string, goroutines*each)
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			for i := range each {
				m := newMessage(fmt.Sprintf("rcpt%d-%d@example.net", g, i))
				if err := s.Put(context.Background(), m, []byte(m.Recipients[0].Addr)); err != nil {
					t.Error(err)
					return
				}
				ids <- m.ID
			}
		})
	}
	wg.Wait()
	close(ids)

	seen := map[string]bool{}
	for id := range ids {
		if seen[id] {
			t.Errorf("duplicate ID %s", id)
		}
		seen[id] = true
	}
	if len(seen) != goroutines*each {
		t.Fatalf("%d IDs, want %d", len(seen), goroutines*each)
	}
	if n, err := s.Len(); err != nil || n != goroutines*each {
		t.Fatalf("Len = %d, %v; want %d", n, err, goroutines*each)
	}
	list, _, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	for i, m := range list {
		if !seen[m.ID] {
			t.Errorf("List has unknown ID %s", m.ID)
		}
		if i > 0 && m.Received.Before(list[i-1].Received) {
			t.Errorf("List not sorted by Received at %d", i)
		}
		if b, err := s.Body(m.ID); err != nil || string(b) != m.Recipients[0].Addr {
			t.Errorf("Body(%s) = %q, %v; want %q", m.ID, b, err, m.Recipients[0].Addr)
		}
	}
}

func TestListSorted(t *testing.T) {
	s, _ := openStore(t)
	base := time.Now().Add(-time.Hour)
	for _, off := range []int{3, 1, 2} {
		m := newMessage("a@example.net")
		m.Received = base.Add(time.Duration(off) * time.Minute)
		m.MessageID = fmt.Sprint(off)
		put(t, s, m, "x")
	}
	list, _, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range list {
		got = append(got, m.MessageID)
	}
	if strings.Join(got, ",") != "1,2,3" {
		t.Errorf("List order %v, want 1,2,3", got)
	}
}

func TestRecovered(t *testing.T) {
	s, path := openStore(t)
	old, fresh := newMessage("a@example.net"), newMessage("b@example.net")
	old.Received = time.Now().Add(-time.Minute)
	put(t, s, old, "x")
	put(t, s, fresh, "y")

	// Claim one message as a scheduler does, then stop without completing.
	now := time.Now()
	c, err := s.Claim(context.Background(), Start{Now: now, Retry: func(int) time.Time { return now.Add(time.Hour) }}, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if claimed := c.Attempts; len(claimed) != 1 || claimed[0].Message.ID != old.ID {
		t.Fatalf("claimed %+v, want only the older message", claimed)
	}

	s = reopen(t, s, path)
	if s.Recovered() != 1 {
		t.Errorf("Recovered = %d, want 1", s.Recovered())
	}
	got, err := s.Get(old.ID)
	if err != nil {
		t.Fatal(err)
	}
	if got.Attempts != 1 || !got.NextAttempt.Equal(now.Add(time.Hour).Round(0)) || len(got.Pending()) != 1 {
		t.Errorf("recovered message %+v: want Attempts 1, NextAttempt in 1h, still pending", got)
	}
	// The count is of messages found in doubt at this Open, not again later.
	s = reopen(t, s, path)
	if s.Recovered() != 0 {
		t.Errorf("Recovered after a clean reopen = %d, want 0", s.Recovered())
	}
}

func TestClaimOrderAndLimit(t *testing.T) {
	s, _ := openStore(t)
	now := time.Now()
	var ids []string
	for i, off := range []time.Duration{-3 * time.Minute, -2 * time.Minute, -time.Minute, time.Hour} {
		m := newMessage("a@example.net")
		m.Received = now.Add(off)
		m.MessageID = fmt.Sprint(i)
		put(t, s, m, "x")
		ids = append(ids, m.ID)
	}
	skip := func(id string) bool { return id == ids[0] }
	next := func(int) time.Time { return now.Add(time.Minute) }
	at := Start{Now: now, Retry: next}
	c, err := s.Claim(context.Background(), at, 1, skip)
	if err != nil {
		t.Fatal(err)
	}
	claimed, wake := c.Attempts, c.Wake
	if len(claimed) != 1 || claimed[0].Message.ID != ids[1] {
		t.Fatalf("claimed %+v, want message 1 (0 is skipped, limit 1)", claimed)
	}
	if string(claimed[0].head) != "x" {
		t.Errorf("claimed body %q", claimed[0].head)
	}
	if !wake.Equal(now.Add(-time.Minute).Round(0)) {
		t.Errorf("wake = %v, want message 2's due time", wake)
	}
	c, err = s.Claim(context.Background(), at, 10, skip)
	if err != nil {
		t.Fatal(err)
	}
	claimed, wake = c.Attempts, c.Wake
	if len(claimed) != 1 || claimed[0].Message.ID != ids[2] {
		t.Fatalf("claimed %+v, want message 2 only (3 is not due)", claimed)
	}
	if !wake.Equal(now.Add(time.Minute).Round(0)) {
		t.Errorf("wake = %v, want the retry of 1 and 2 in a minute", wake)
	}
}

func TestDecodeGarbage(t *testing.T) {
	valid, err := encodeRecord(&record{Message: *newMessageWithID()})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := decodeMessage(valid); err != nil {
		t.Fatalf("valid record: %v", err)
	}
	for name, b := range map[string][]byte{
		"nil":           nil,
		"version only":  {recordVersion},
		"wrong version": append([]byte{recordVersion + 1}, valid[1:]...),
		"truncated":     valid[:len(valid)/2],
		"not json":      append([]byte{recordVersion}, "\x00\xff garbage"...),
		"null":          append([]byte{recordVersion}, "null"...),
		"empty object":  append([]byte{recordVersion}, "{}"...),
		"wrong types":   append([]byte{recordVersion}, `{"id":7,"rcpts":"x"}`...),
		"state range":   append([]byte{recordVersion}, `{"id":"a","rcpts":[{"addr":"x","state":300}]}`...),
		"no recipients": append([]byte{recordVersion}, `{"id":"a"}`...),
	} {
		if m, err := decodeMessage(b); err == nil {
			t.Errorf("%s: decoded %+v, want an error", name, m)
		}
	}
}

func newMessageWithID() *Message {
	m := newMessage("a@example.net")
	m.ID = NewID()
	m.Received = time.Now()
	return m
}

func FuzzDecodeMessage(f *testing.F) {
	valid, err := encodeRecord(&record{Message: *newMessageWithID(), Spooled: true})
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add([]byte{})
	f.Add([]byte{recordVersion, '{', '}'})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMessage(b)
		if err == nil && (m.ID == "" || len(m.Recipients) == 0) {
			t.Errorf("decoded an invalid message without error: %+v", m)
		}
	})
}

func TestStorageErrorDiskFull(t *testing.T) {
	for name, err := range map[string]error{
		"wrapped":  &fs.PathError{Op: "write", Path: "queue.db", Err: syscall.ENOSPC},
		"as text":  fmt.Errorf("file resize error: %s", syscall.ENOSPC), // how bbolt reports a failed grow
		"other":    syscall.EIO,
		"sentinel": ErrNotFound,
	} {
		got := storageError("put", err)
		want := name == "wrapped" || name == "as text"
		if errors.Is(got, syscall.ENOSPC) != want {
			t.Errorf("%s: errors.Is(%v, ENOSPC) = %v, want %v", name, got, !want, want)
		}
		if !errors.Is(got, err) {
			t.Errorf("%s: %v does not wrap the cause", name, got)
		}
	}
}
