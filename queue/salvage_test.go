package queue

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// leafKeys returns the keys of leaf page id of the file at path.
func leafKeys(t *testing.T, path string, l fileLayout, id uint64) []string {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	p := data[int(id)*l.pageSize:]
	var keys []string
	for i := range int(binary.LittleEndian.Uint16(p[10:])) {
		e := p[pageHeaderSize+i*elemSize:]
		pos, ksize := binary.LittleEndian.Uint32(e[4:]), binary.LittleEndian.Uint32(e[8:])
		start := pageHeaderSize + i*elemSize + int(pos)
		keys = append(keys, string(p[start:start+int(ksize)]))
	}
	return keys
}

// salvageFixture is a closed queue file with messages in every state a
// salvage must carry over, and what it holds.
type salvageFixture struct {
	path    string
	msgs    map[string]Entry // as List shows them, InFlight left out
	bodies  map[string][]byte
	special []string // IDs of the messages with a state of their own
	spooled string   // ID of the message with a spool file
}

func newSalvageFixture(t *testing.T) *salvageFixture {
	t.Helper()
	now := time.Now().Round(0)
	path := filepath.Join(t.TempDir(), "queue.db")
	s, err := Open(path, Options{Logger: slog.New(slog.DiscardHandler), Now: func() time.Time { return now }})
	if err != nil {
		t.Fatal(err)
	}
	// Messages retried before, with replies (benchRecord), ...
	if err := benchFill(s, 200); err != nil {
		t.Fatal(err)
	}
	fx := &salvageFixture{path: path}
	// ... one held, one DSN, one with a spool file, one whose recipients
	// were delivered and refused in part, one claimed by an attempt that
	// a crash interrupted.
	held := newMessage("held@example.net")
	put(t, s, held, "Subject: held\r\n\r\nheld\r\n")
	if err := s.Hold(held.ID); err != nil {
		t.Fatal(err)
	}
	dsn := &Message{From: "", DSN: true, Recipients: []Recipient{{Addr: "app@example.com"}}}
	put(t, s, dsn, "Subject: Undelivered Mail\r\n\r\nreport\r\n")
	large := newMessage("large@example.net")
	putSpooled(t, s, large, spoolContent(300<<10))
	fx.spooled = large.ID
	partial := newMessage("ok@example.net", "refused@example.net", "later@example.net")
	partial.Received = now.Add(-time.Hour)
	put(t, s, partial, "Subject: partial\r\n\r\npartial\r\n")
	claimed := newMessage("claimed@example.net")
	claimed.Received = now.Add(-2 * time.Hour)
	put(t, s, claimed, "Subject: claimed\r\n\r\nclaimed\r\n")
	// One scheduler pass over the two due first (partial, claimed).
	var got []Attempt
	c, err := s.Claim(context.Background(), Start{Now: now, Retry: func(int) time.Time { return now.Add(time.Hour) }}, 500, nil)
	if err != nil {
		t.Fatal(err)
	}
	out := c.Attempts
	for _, d := range out {
		if d.Message.ID == partial.ID || d.Message.ID == claimed.ID {
			got = append(got, d)
		}
	}
	if len(got) != 2 {
		t.Fatalf("claimed %d of the two", len(got))
	}
	_, err = finish(t, s, partial.ID, func(m *Message) (bool, []DSN) {
		m.Recipients[0].State, m.Recipients[0].Reply, m.Recipients[0].Upstream = Delivered, "250 ok", "up"
		m.Recipients[1].State, m.Recipients[1].Reply, m.Recipients[1].Upstream = Failed, "550 no such user", "up"
		m.Recipients[2].Reply, m.Recipients[2].Upstream = "451 later", "up"
		m.LastReply, m.Warned = "451 later", true
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Every other claim of that pass is finished as deferred; claimed's
	// stays, as a crash mid-delivery leaves it.
	for _, d := range out {
		if d.Message.ID != claimed.ID && d.Message.ID != partial.ID {
			if _, err := s.Finish(context.Background(), d, nil, func(*Message) (bool, []DSN) { return false, nil }); err != nil {
				t.Fatal(err)
			}
		}
	}
	fx.special = []string{held.ID, dsn.ID, large.ID, partial.ID, claimed.ID}

	list, bad, err := s.List()
	if err != nil || len(bad) > 0 {
		t.Fatalf("List: %v %v", bad, err)
	}
	fx.msgs, fx.bodies = map[string]Entry{}, map[string][]byte{}
	for _, m := range list {
		m.InFlight = false
		fx.msgs[m.ID] = m
		if fx.bodies[m.ID], err = s.Body(m.ID); err != nil {
			t.Fatal(err)
		}
	}
	if !get(t, s, claimed.ID).InFlight {
		t.Fatal("the claimed message is not in flight")
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return fx
}

// TestSalvage damages a page of records and a page of bodies in a real
// queue file and salvages it: every other message is copied with its full
// state (recipients' states and replies, attempts, times, held, DSN, the
// spool file) and delivered from the new queue; each message of the
// damaged pages is reported by ID with the reason; the old file is not
// written.
func TestSalvage(t *testing.T) {
	fx := newSalvageFixture(t)
	l := layoutOf(t, fx.path)
	// A page of records and a page of bodies that hold none of the
	// special messages, so that those are checked field by field.
	pick := func(bucket string) (uint64, []string) {
		for _, id := range l.leaves[bucket] {
			keys := leafKeys(t, fx.path, l, id)
			if !slices.ContainsFunc(keys, func(k string) bool { return slices.Contains(fx.special, k) }) {
				return id, keys
			}
		}
		t.Fatalf("no leaf of %s without the special messages", bucket)
		return 0, nil
	}
	recPage, lostRecords := pick("msgs")
	bodyPage, lostBodies := pick("bodies")
	patch(t, fx.path, int64(recPage)*int64(l.pageSize)+pageHeaderSize, randomBytes(5, 64))
	patch(t, fx.path, int64(bodyPage)*int64(l.pageSize)+8, le16(0x04))
	hash := fileHash(t, fx.path)
	t.Logf("damaged page %d (%d records) and page %d (%d bodies) of %d messages", recPage, len(lostRecords), bodyPage, len(lostBodies), len(fx.msgs))

	// The relay refuses it.
	if _, err := Open(fx.path, Options{Logger: slog.New(slog.DiscardHandler)}); !errors.Is(err, ErrDamaged) {
		t.Fatalf("Open: %v, want ErrDamaged", err)
	}

	newPath := filepath.Join(t.TempDir(), "new.db")
	dst, err := Open(newPath, Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	sal, err := OpenSalvage(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := sal.CopyTo(context.Background(), dst)
	sal.Close()
	if err != nil {
		t.Fatal(err)
	}
	if fileHash(t, fx.path) != hash {
		t.Error("salvage changed the damaged file")
	}
	for _, d := range rep.Damage {
		t.Logf("damage: %s", d)
	}
	if len(rep.Damage) < 2 {
		t.Errorf("damage reported: %v, want both pages", rep.Damage)
	}

	lost := map[string]string{}
	for _, m := range rep.Lost {
		lost[m.ID] = m.Reason
	}
	// A record of the damaged page is either reported lost by ID, or, if
	// an older copy of it was found in a page bbolt had freed, saved on
	// hold for an operator to check.
	for _, id := range lostRecords {
		if lost[id] == "" && !slices.Contains(rep.Unsure, id) {
			t.Errorf("%s (record in the damaged page): neither on hold nor reported lost", id)
		}
	}
	// A body of the damaged page is either reported lost, or was found in
	// a freed copy of its page: a body never changes, so the message is
	// saved as it was (checked below).
	for _, id := range lostBodies {
		if _, saved := fx.msgs[id]; lost[id] == "" && !saved {
			t.Errorf("%s (body in the damaged page): neither saved nor reported lost", id)
		}
	}
	for _, id := range rep.Unsure {
		if !slices.Contains(lostRecords, id) {
			t.Errorf("%s saved as unsure, but its record was not in the damaged page", id)
		}
	}
	if len(lost) != len(rep.Lost) || rep.Unnamed != 0 || rep.Saved+len(lost) != len(fx.msgs) {
		t.Errorf("saved %d, lost %d (%d distinct), unnamed %d; of %d messages", rep.Saved, len(rep.Lost), len(lost), rep.Unnamed, len(fx.msgs))
	}
	if rep.Spooled != 1 || rep.Held != 1+len(rep.Unsure) {
		t.Errorf("saved %d spooled and %d held, want 1 and %d", rep.Spooled, rep.Held, 1+len(rep.Unsure))
	}
	t.Logf("saved %d (%d on hold from freed pages), lost %d", rep.Saved, len(rep.Unsure), len(rep.Lost))

	// The new queue holds exactly the others, as they were.
	list, bad, err := dst.List()
	if err != nil || len(bad) > 0 {
		t.Fatalf("List: %v %v", bad, err)
	}
	if len(list) != rep.Saved {
		t.Errorf("new queue holds %d messages, the report says %d saved", len(list), rep.Saved)
	}
	for _, m := range list {
		want, ok := fx.msgs[m.ID]
		if !ok || lost[m.ID] != "" {
			t.Errorf("%s: saved but not expected", m.ID)
			continue
		}
		if m.InFlight {
			t.Errorf("%s: in flight in the new queue", m.ID)
		}
		if slices.Contains(rep.Unsure, m.ID) {
			if !m.Held {
				t.Errorf("%s: found in a freed page, but not held", m.ID)
			}
		} else if !reflect.DeepEqual(m, want) {
			t.Errorf("%s: state\n%+v\nwant\n%+v", m.ID, m, want)
		}
		if body, err := dst.Body(m.ID); err != nil || !bytes.Equal(body, fx.bodies[m.ID]) {
			t.Errorf("%s: body of %d bytes (%v), want %d", m.ID, len(body), err, len(fx.bodies[m.ID]))
		}
	}
	if _, err := os.Stat(filepath.Join(newPath+".spool", fx.spooled)); err != nil {
		t.Errorf("the spool file was not copied: %v", err)
	}
	checkIndex(t, dst)
	if n, err := dst.Len(); err != nil || n != rep.Saved {
		t.Errorf("Len = %d, %v; want %d", n, err, rep.Saved)
	}
	if st, err := dst.Stats(); err != nil || st.Held != rep.Held || st.Queued != rep.Saved-rep.Held || st.InFlight != 0 {
		t.Errorf("Stats = %+v, %v", st, err)
	}

	// Delivered from the new queue once the held ones are released, the
	// spooled one whole.
	for _, id := range append([]string{fx.special[0]}, rep.Unsure...) {
		if err := dst.Release(id); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := dst.Flush(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	delivered := map[string][]byte{}
	s := newScheduler(t, dst, func(_ context.Context, m Message, body Body) []Result {
		data := content(t, body)
		mu.Lock()
		defer mu.Unlock()
		delivered[m.ID] = data
		return results(m, Delivered, "250 ok")
	})
	done := doneChan(s, rep.Saved)
	start(t, s)
	for range rep.Saved {
		receive(t, done, "a delivery from the salvaged queue")
	}
	mu.Lock()
	defer mu.Unlock()
	for id, body := range delivered {
		if !bytes.Equal(body, fx.bodies[id]) {
			t.Errorf("%s: delivered %d bytes, want %d", id, len(body), len(fx.bodies[id]))
		}
	}
	if !bytes.Equal(delivered[fx.spooled], fx.bodies[fx.spooled]) || len(delivered) != rep.Saved {
		t.Errorf("delivered %d messages (the spooled one: %d bytes)", len(delivered), len(delivered[fx.spooled]))
	}
}

// TestSalvageIntact: a sound file is copied whole, and salvage reports
// nothing lost.
func TestSalvageIntact(t *testing.T) {
	fx := newSalvageFixture(t)
	dst, err := Open(filepath.Join(t.TempDir(), "new.db"), Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	sal, err := OpenSalvage(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	defer sal.Close()
	rep, err := sal.CopyTo(context.Background(), dst)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Saved != len(fx.msgs) || len(rep.Lost) > 0 || len(rep.Damage) > 0 || rep.Unnamed > 0 {
		t.Errorf("report %+v; want all %d saved", rep, len(fx.msgs))
	}
}

// TestSalvageCutShort: a file cut to half its pages is read as far as it
// goes, without a fault. bbolt writes every change to new pages, so the
// root of the tree, rewritten by the last commit, is near the end and
// lost with it: salvage says that it cannot tell how many messages were
// lost, and names those it knows of (by their spool files).
func TestSalvageCutShort(t *testing.T) {
	fx := newSalvageFixture(t)
	l := layoutOf(t, fx.path)
	if err := os.Truncate(fx.path, int64(l.pages/2*l.pageSize)); err != nil {
		t.Fatal(err)
	}
	hash := fileHash(t, fx.path)
	dst, err := Open(filepath.Join(t.TempDir(), "new.db"), Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	sal, err := OpenSalvage(fx.path)
	if err != nil {
		t.Fatal(err)
	}
	defer sal.Close()
	rep, err := sal.CopyTo(context.Background(), dst)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("saved %d (%d on hold from pages outside the tree), lost %d, unnamed %d, %d damaged pages",
		rep.Saved, len(rep.Unsure), len(rep.Lost), rep.Unnamed, len(rep.Damage))
	if fileHash(t, fx.path) != hash {
		t.Error("salvage changed the file")
	}
	if len(rep.Damage) == 0 || !strings.Contains(rep.Damage[0], "cut short") {
		t.Errorf("damage %v, want the file cut short first", rep.Damage)
	}
	// The records in the half that is left are found, and held.
	if rep.Saved == 0 || len(rep.Unsure) == 0 {
		t.Errorf("saved %d, %d of them held as unsure: want what is in the half left", rep.Saved, len(rep.Unsure))
	}
	list, _, err := dst.List()
	if err != nil || len(list) != rep.Saved {
		t.Fatalf("new queue holds %d (%v), report says %d saved", len(list), err, rep.Saved)
	}
	for _, m := range list {
		if _, ok := fx.msgs[m.ID]; !ok {
			t.Errorf("%s: saved, but was not in the queue", m.ID)
		}
		if slices.Contains(rep.Unsure, m.ID) && !m.Held {
			t.Errorf("%s: unsure but not held", m.ID)
		}
		if body, err := dst.Body(m.ID); err != nil || !bytes.Equal(body, fx.bodies[m.ID]) {
			t.Errorf("%s: body of %d bytes (%v), want %d", m.ID, len(body), err, len(fx.bodies[m.ID]))
		}
	}
	if rep.Unnamed != -1 && rep.Saved+len(rep.Lost)+rep.Unnamed < len(fx.msgs) {
		t.Errorf("saved %d, lost %d of %d, and unnamed %d: the rest is neither counted nor said unknown", rep.Saved, len(rep.Lost), len(fx.msgs), rep.Unnamed)
	}
}

// TestSalvageLocked: a file that a running relay holds is refused.
func TestSalvageLocked(t *testing.T) {
	s, path := openStore(t)
	put(t, s, newMessage("a@example.net"), "x")
	if _, err := OpenSalvage(path); !errors.Is(err, ErrLocked) {
		t.Fatalf("OpenSalvage of an open queue: %v, want ErrLocked", err)
	}
}

// TestImportExists: importing an ID that is stored already changes
// nothing, so that a second import copies nothing twice.
func TestImportExists(t *testing.T) {
	s, _ := openStore(t)
	m := newMessage("a@example.net")
	put(t, s, m, "first")
	again := get(t, s, m.ID).Message
	again.Attempts = 7
	if err := s.Import(context.Background(), again, []byte("second"), strings.NewReader("more")); !errors.Is(err, ErrExists) {
		t.Fatalf("Import of a stored ID: %v, want ErrExists", err)
	}
	if got := get(t, s, m.ID); got.Attempts != 0 {
		t.Errorf("Attempts = %d: the stored message changed", got.Attempts)
	}
	if body, err := s.Body(m.ID); err != nil || string(body) != "first" {
		t.Errorf("body %q, %v", body, err)
	}
	if files := spoolFiles(t, s.path); len(files) != 0 {
		t.Errorf("spool files left: %v", files)
	}
}
