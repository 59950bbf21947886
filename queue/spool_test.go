package queue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

const spoolHead = "From: <app@example.com>\r\nSubject: large\r\n\r\n"

// spoolContent is n bytes of body lines, different on every line so that
// a misplaced chunk shows.
func spoolContent(n int) []byte {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %07d %s\r\n", i, strings.Repeat("x", 60))
	}
	return b.Bytes()[:n]
}

// putSpooled stores m with head spoolHead and content written to a spool
// in 64 KiB chunks, and returns the whole body.
func putSpooled(t *testing.T, s *Store, m *Message, content []byte) []byte {
	t.Helper()
	sp, err := s.NewSpool()
	if err != nil {
		t.Fatal(err)
	}
	for rest := content; len(rest) > 0; {
		n := min(64<<10, len(rest))
		if _, err := sp.Write(rest[:n]); err != nil {
			t.Fatal(err)
		}
		rest = rest[n:]
	}
	if err := s.PutSpooled(context.Background(), m, []byte(spoolHead), sp); err != nil {
		t.Fatal(err)
	}
	return append([]byte(spoolHead), content...)
}

// spoolFiles lists the names in the spool directory of the queue at path.
func spoolFiles(t *testing.T, path string) []string {
	t.Helper()
	entries, err := os.ReadDir(path + ".spool")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// deliverAll starts a scheduler that delivers every message and sends
// the body it delivers on bodies; done receives the message as it leaves
// the queue.
func deliverAll(t *testing.T, st *Store) (bodies chan []byte, done chan Message) {
	t.Helper()
	bodies = make(chan []byte, 1)
	s := newScheduler(t, st, func(_ context.Context, m Message, body Body) []Result {
		bodies <- content(t, body)
		return results(m, Delivered, "250 ok")
	})
	done = doneChan(s, 1)
	start(t, s)
	return bodies, done
}

func TestSpoolLifecycle(t *testing.T) {
	st, path := openStore(t)
	di, err := os.Stat(path + ".spool")
	if err != nil {
		t.Fatal(err)
	}
	if di.Mode().Perm() != 0o700 {
		t.Errorf("spool directory mode %v, want 0700", di.Mode().Perm())
	}

	m := newMessage("a@example.net")
	want := putSpooled(t, st, m, spoolContent(3<<20+7))
	if m.Size != int64(len(want)) {
		t.Errorf("Size = %d, want %d", m.Size, len(want))
	}
	if files := spoolFiles(t, path); !slices.Equal(files, []string{m.ID}) {
		t.Errorf("spool files %q, want only %s", files, m.ID)
	}
	fi, err := os.Stat(filepath.Join(path+".spool", m.ID))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Size() != int64(len(want)-len(spoolHead)) {
		t.Errorf("spool file mode %v, size %d", fi.Mode().Perm(), fi.Size())
	}
	got, err := st.Body(m.ID)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("Body: %d bytes, want the %d of head and file", len(got), len(want))
	}
	// bbolt holds only the head.
	err = st.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bodiesBucket).Get([]byte(m.ID)); string(v) != spoolHead {
			t.Errorf("bodies bucket holds %d bytes, want the head", len(v))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}

	// A delivery gets the whole message; once it is delivered, the file goes.
	bodies, done := deliverAll(t, st)
	if b := receive(t, bodies, "the delivery"); !bytes.Equal(b, want) {
		t.Errorf("delivered %d bytes, want %d, identical", len(b), len(want))
	}
	receive(t, done, "the message to leave the queue")
	if files := spoolFiles(t, path); len(files) != 0 {
		t.Errorf("spool files %q left after delivery", files)
	}
}

// TestSpoolBodyStreamed: the Body a delivery gets for a spooled message
// holds only the head in memory; its readers each read the whole message
// from the start, independently (one upstream after another), even once
// the message was deleted and its file removed during the attempt.
func TestSpoolBodyStreamed(t *testing.T) {
	st, path := openStore(t)
	type seen struct {
		head          []byte
		size          int64
		first, second []byte
	}
	got := make(chan seen, 1)
	s := newScheduler(t, st, func(_ context.Context, m Message, body Body) []Result {
		if err := st.Delete(m.ID); err != nil {
			t.Error(err)
		}
		v := seen{head: bytes.Clone(body.Head()), size: body.Size()}
		r1, r2 := body.Reader(), body.Reader()
		part := make([]byte, body.Size()/3)
		if _, err := io.ReadFull(r1, part); err != nil {
			t.Error(err)
		}
		v.second = mustRead(t, r2)
		v.first = append(part, mustRead(t, r1)...)
		got <- v
		return results(m, Delivered, "250 ok")
	})
	start(t, s)
	m := newMessage("a@example.net")
	want := putSpooled(t, st, m, spoolContent(5<<20+3))

	v := receive(t, got, "the delivery")
	if string(v.head) != spoolHead || v.size != int64(len(want)) {
		t.Errorf("Head %d bytes, Size %d; want the %d bytes of the head and Size %d", len(v.head), v.size, len(spoolHead), len(want))
	}
	if !bytes.Equal(v.first, want) || !bytes.Equal(v.second, want) {
		t.Errorf("readers got %d and %d bytes, want the %d stored, identical", len(v.first), len(v.second), len(want))
	}
	if files := spoolFiles(t, path); len(files) != 0 {
		t.Errorf("spool files %q after the message was deleted", files)
	}
}

// mustRead reads r to its end; an error fails the test.
func mustRead(t *testing.T, r io.Reader) []byte {
	b, err := io.ReadAll(r)
	if err != nil {
		t.Errorf("read: %v", err)
	}
	return b
}

func TestSpoolAbort(t *testing.T) {
	st, path := openStore(t)
	sp, err := st.NewSpool()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sp.Write([]byte("partial")); err != nil {
		t.Fatal(err)
	}
	if files := spoolFiles(t, path); len(files) != 1 || !strings.HasPrefix(files[0], tmpPrefix) {
		t.Fatalf("spool files %q, want one temporary file", files)
	}
	if err := sp.Abort(); err != nil {
		t.Fatal(err)
	}
	if err := sp.Abort(); err != nil {
		t.Errorf("second Abort: %v", err)
	}
	if files := spoolFiles(t, path); len(files) != 0 {
		t.Errorf("spool files %q after Abort", files)
	}
	if _, err := sp.Write([]byte("more")); err == nil {
		t.Error("Write after Abort succeeded")
	}
	m := newMessage("a@example.net")
	if err := st.PutSpooled(context.Background(), m, []byte(spoolHead), sp); err == nil {
		t.Error("PutSpooled of an aborted spool succeeded")
	}
	if n, _ := st.Len(); n != 0 {
		t.Errorf("Len = %d, want 0", n)
	}
}

// TestSpoolPutFailure: when the record cannot be stored, the file goes
// too, and a colliding ID never touches the file of the message that has
// it.
func TestSpoolPutFailure(t *testing.T) {
	st, path := openStore(t)
	ctx := context.Background()

	sp, _ := st.NewSpool()
	sp.Write([]byte("body\r\n"))
	if err := st.PutSpooled(ctx, newMessage(), []byte(spoolHead), sp); err == nil {
		t.Error("PutSpooled without recipients succeeded")
	}

	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	sp, _ = st.NewSpool()
	if err := st.PutSpooled(cancelled, newMessage("a@example.net"), []byte(spoolHead), sp); !errors.Is(err, context.Canceled) {
		t.Errorf("PutSpooled with a cancelled context: %v", err)
	}

	sp, _ = st.NewSpool()
	if err := st.PutSpooled(ctx, &Message{ID: "../escape", Recipients: []Recipient{{Addr: "a@example.net"}}}, []byte(spoolHead), sp); err == nil {
		t.Error("PutSpooled with a path for an ID succeeded")
	}
	if files := spoolFiles(t, path); len(files) != 0 {
		t.Fatalf("spool files %q after failed puts", files)
	}

	// A spooled message, and one in bbolt only; new messages reuse their IDs.
	first := newMessage("a@example.net")
	want := putSpooled(t, st, first, spoolContent(100<<10))
	plain := newMessage("b@example.net")
	put(t, st, plain, "plain")
	for _, id := range []string{first.ID, plain.ID} {
		sp, _ := st.NewSpool()
		sp.Write([]byte("intruder\r\n"))
		dup := newMessage("c@example.net")
		dup.ID = id
		if err := st.PutSpooled(ctx, dup, []byte(spoolHead), sp); err == nil {
			t.Errorf("PutSpooled with the ID of %s succeeded", id)
		}
	}
	if got, err := st.Body(first.ID); err != nil || !bytes.Equal(got, want) {
		t.Errorf("Body of the first message changed: %d bytes, %v", len(got), err)
	}
	if got, err := st.Body(plain.ID); err != nil || string(got) != "plain" {
		t.Errorf("Body of the plain message: %q, %v", got, err)
	}
	if files := spoolFiles(t, path); !slices.Equal(files, []string{first.ID}) {
		t.Errorf("spool files %q, want only %s", files, first.ID)
	}

	// A spool once stored is the queue's: using it again fails, and
	// aborting it then removes nothing.
	sp, _ = st.NewSpool()
	sp.Write([]byte("kept\r\n"))
	kept := newMessage("d@example.net")
	if err := st.PutSpooled(ctx, kept, []byte(spoolHead), sp); err != nil {
		t.Fatal(err)
	}
	if err := st.PutSpooled(ctx, newMessage("e@example.net"), []byte(spoolHead), sp); err == nil {
		t.Error("second PutSpooled of one spool succeeded")
	}
	sp.Abort()
	if got, err := st.Body(kept.ID); err != nil || string(got) != spoolHead+"kept\r\n" {
		t.Errorf("Body after reusing its spool: %q, %v", got, err)
	}
}

// TestSpoolReopen: a spooled message survives Close and Open and is then
// delivered byte-identical; what a crash leaves in the spool directory (a
// temporary file, a renamed file whose record was never committed) is
// removed at Open, and nothing else is.
func TestSpoolReopen(t *testing.T) {
	st, path := openStore(t)
	m := newMessage("a@example.net")
	want := putSpooled(t, st, m, spoolContent(2<<20))
	if err := st.Close(); err != nil {
		t.Fatal(err)
	}
	dir := path + ".spool"
	for _, name := range []string{tmpPrefix + "123456", NewID(), "not-a-queue-id"} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("left by a crash"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "operator"), 0o700); err != nil {
		t.Fatal(err)
	}

	st, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	if files := spoolFiles(t, path); !slices.Equal(files, []string{m.ID, "operator"}) && !slices.Equal(files, []string{"operator", m.ID}) {
		t.Errorf("spool files after Open %q, want %s and the directory", files, m.ID)
	}
	bodies, done := deliverAll(t, st)
	if b := receive(t, bodies, "the delivery"); !bytes.Equal(b, want) {
		t.Errorf("delivered %d bytes after reopening, want the %d stored", len(b), len(want))
	}
	receive(t, done, "the message to leave the queue")
	if files := spoolFiles(t, path); !slices.Equal(files, []string{"operator"}) {
		t.Errorf("spool files %q after delivery", files)
	}
}

func TestSpoolDelete(t *testing.T) {
	now := time.Now()
	st := openStoreAt(t, now)
	m := newMessage("a@example.net")
	putSpooled(t, st, m, spoolContent(10<<10))
	file := filepath.Join(st.spool, m.ID)
	if _, err := os.Stat(file); err != nil {
		t.Fatal(err)
	}
	if err := st.Delete(m.ID); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("spool file after Delete: %v", err)
	}
	if _, err := st.Body(m.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Body after Delete: %v, want ErrNotFound", err)
	}
	checkIndex(t, st)
}

// TestSpoolBounce: a DSN about a spooled message gets the whole message,
// headers first, and the file goes when the message expires.
func TestSpoolBounce(t *testing.T) {
	st, path := openStore(t)
	s := newScheduler(t, st, func(_ context.Context, m Message, body Body) []Result {
		if m.DSN {
			return results(m, Delivered, "250 ok")
		}
		return results(m, Pending, "451 4.4.1 try later")
	})
	s.MaxAge = time.Hour
	s.Now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	bounced := make(chan []byte, 1)
	b := &bouncer{}
	s.Bounce = func(kind BounceKind, m Message, rcpts []Recipient, body Body) (*Message, []byte) {
		bounced <- content(t, body)
		return b.bounce(kind, m, rcpts, body)
	}
	done := doneChan(s, 2)
	start(t, s)
	m := newMessage("a@example.net")
	want := putSpooled(t, st, m, spoolContent(300<<10))

	if got := receive(t, bounced, "the bounce"); !bytes.Equal(got, want) || !bytes.HasPrefix(got, []byte(spoolHead)) {
		t.Errorf("Bounce got %d bytes, want the %d of the message, headers first", len(got), len(want))
	}
	for range 2 {
		receive(t, done, "the expired message and its DSN to leave the queue")
	}
	if files := spoolFiles(t, path); len(files) != 0 {
		t.Errorf("spool files %q after expiry", files)
	}
}

// TestSpoolFileLost: a record whose file is gone (not something the queue
// does itself) fails at once as lost, and bounces with its headers.
func TestSpoolFileLost(t *testing.T) {
	st, _ := openStore(t)
	m := newMessage("a@example.net")
	putSpooled(t, st, m, spoolContent(1000))
	if err := os.Remove(filepath.Join(st.spool, m.ID)); err != nil {
		t.Fatal(err)
	}
	if _, err := st.Body(m.ID); !errors.Is(err, ErrNotFound) {
		t.Errorf("Body without its file: %v, want ErrNotFound", err)
	}
	s := newScheduler(t, st, func(_ context.Context, m Message, body Body) []Result {
		if !m.DSN {
			t.Errorf("message without content delivered: %d bytes", body.Size())
		}
		return results(m, Delivered, "250 ok")
	})
	bounced := make(chan []byte, 1)
	b := &bouncer{}
	s.Bounce = func(kind BounceKind, m Message, rcpts []Recipient, body Body) (*Message, []byte) {
		if len(rcpts) != 1 || rcpts[0].State != Failed || !strings.Contains(rcpts[0].Reply, "lost") {
			t.Errorf("bounced %+v", rcpts)
		}
		bounced <- content(t, body)
		return b.bounce(kind, m, rcpts, body)
	}
	start(t, s)
	if got := receive(t, bounced, "the bounce"); string(got) != spoolHead {
		t.Errorf("Bounce got %q, want the head", got)
	}
}

// TestSpoolDiskFull fills a small tmpfs: a Write fails with ENOSPC, which
// callers answer with 452 4.3.1, and Abort gives the space back.
func TestSpoolDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	mnt := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", mnt).CombinedOutput(); err != nil {
		t.Skipf("mount tmpfs: %v: %s", err, bytes.TrimSpace(out))
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, out)
		}
	})
	path := filepath.Join(mnt, "queue.db")
	st, err := Open(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })

	sp, err := st.NewSpool()
	if err != nil {
		t.Fatal(err)
	}
	chunk := spoolContent(64 << 10)
	for i := 0; ; i++ {
		if i > 100 {
			t.Fatal("wrote 6 MB to a 2 MB filesystem")
		}
		if _, err = sp.Write(chunk); err != nil {
			break
		}
	}
	if !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("Write on a full disk: %v, want ENOSPC", err)
	}
	if err := st.PutSpooled(context.Background(), newMessage("a@example.net"), []byte(spoolHead), sp); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("PutSpooled after ENOSPC: %v, want ENOSPC", err)
	}
	if files := spoolFiles(t, path); len(files) != 0 {
		t.Errorf("spool files %q after a failed put", files)
	}
	// The space is back: a message fits again.
	m := newMessage("a@example.net")
	want := putSpooled(t, st, m, spoolContent(512<<10))
	if got, err := st.Body(m.ID); err != nil || !bytes.Equal(got, want) {
		t.Errorf("Body after the disk emptied: %d bytes, %v", len(got), err)
	}
}
