package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	byteorder "encoding/binary" // "binary" is the path of the smarthost binary here
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

// queuedRelay is a stopped relay whose queue holds messages that its
// upstream, down, never took.
type queuedRelay struct {
	pki    *testpki.PKI
	upAddr string
	freeUp func() // lets an upstream listen at upAddr
	cfg    string
	queue  string
	sent   map[string]string // queue ID → message
}

// fillQueue runs a relay with its upstream down, submits n messages of
// about 3 KB and the large ones given (over 1 MiB: spool files), and
// stops it cleanly.
func fillQueue(t *testing.T, n int, large ...int) *queuedRelay {
	t.Helper()
	q := &queuedRelay{pki: testpki.New(t), sent: map[string]string{}}
	q.upAddr, q.freeUp = reserveAddr(t)
	dir := t.TempDir()
	q.cfg = writeConfig(t, relayConfig{Dir: dir, PKI: q.pki, UpstreamAddr: q.upAddr, RetryMin: "1h", RetryMax: "2h"})
	q.queue = filepath.Join(dir, "queue.db")
	r := startRelay(t, q.cfg)
	s := connect(t, r.addr, q.pki)
	sizes := slices.Repeat([]int{3 << 10}, n)
	for i, size := range append(sizes, large...) {
		msg := sizedMessage(fmt.Sprintf("full-%d", i), size)
		id, err := s.send("app@example.com", []string{"bob@example.net"}, msg)
		if err != nil {
			t.Fatal(err)
		}
		q.sent[id] = msg
	}
	s.close()
	r.stop()
	return q
}

// leafPages returns the page size of the bbolt file at path and the leaf
// pages of its bucket, each with the keys it holds, found with bbolt and
// by reading the pages from the file.
func leafPages(t *testing.T, path, bucket string) (int, map[uint64][]string) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ps := db.Info().PageSize
	leaves := map[uint64][]string{}
	err = db.View(func(tx *bolt.Tx) error {
		pages := []uint64{uint64(tx.Bucket([]byte(bucket)).Root())}
		for len(pages) > 0 {
			id := pages[0]
			pages = pages[1:]
			p := data[int(id)*ps:]
			flags, count := byteorder.LittleEndian.Uint16(p[8:]), int(byteorder.LittleEndian.Uint16(p[10:]))
			for i := range count {
				e := p[16+16*i:]
				if flags == 0x01 { // branch: pos, ksize, child page
					pages = append(pages, byteorder.LittleEndian.Uint64(e[8:]))
					continue
				}
				pos, ksize := byteorder.LittleEndian.Uint32(e[4:]), byteorder.LittleEndian.Uint32(e[8:])
				start := 16 + 16*i + int(pos)
				leaves[id] = append(leaves[id], string(p[start:start+int(ksize)]))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return ps, leaves
}

// usedBytes is how much of the bbolt file at path its pages in use take:
// bbolt grows the file ahead of them.
func usedBytes(t *testing.T, path string) int64 {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var size int64
	db.View(func(tx *bolt.Tx) error { size = tx.Size(); return nil })
	return size
}

func writeAt(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func hashFile(t *testing.T, path string) [32]byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(data)
}

// anyLeaf returns a leaf page of the map, the lowest.
func anyLeaf(leaves map[uint64][]string) uint64 {
	ids := make([]uint64, 0, len(leaves))
	for id := range leaves {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids[0]
}

// TestServeRefusesDamagedQueue: `smarthost serve` on a queue file cut
// short (to half the pages in use) or with damaged pages exits 1 with one log line that names the
// file, what is wrong and what to do, without a panic or a fault, and
// leaves the file as it was. Before, the cut file crashed it with SIGBUS
// or a bbolt panic at every start, and a damaged page could be served.
func TestServeRefusesDamagedQueue(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		problem string
		damage  func(t *testing.T, path string)
	}{
		{"cut to half its pages", "cut short", func(t *testing.T, path string) {
			if err := os.Truncate(path, usedBytes(t, path)/2); err != nil {
				t.Fatal(err)
			}
		}},
		{"page flags flipped", "neither a branch nor a leaf", func(t *testing.T, path string) {
			ps, leaves := leafPages(t, path, "msgs")
			writeAt(t, path, int64(anyLeaf(leaves))*int64(ps)+8, []byte{0x10, 0x00})
		}},
		{"garbage in a page", "bucket msgs", func(t *testing.T, path string) {
			ps, leaves := leafPages(t, path, "msgs")
			garbage := bytes.Repeat([]byte{0xA5, 0x5A, 0xFF, 0x13}, 64)
			writeAt(t, path, int64(anyLeaf(leaves))*int64(ps)+16, garbage)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			q := fillQueue(t, 40)
			tc.damage(t, q.queue)
			hash := hashFile(t, q.queue)

			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			cmd := exec.CommandContext(ctx, binary, "serve", "-config", q.cfg)
			cmd.Env = append(os.Environ(), upPassEnv+"="+upPassword, adminEnv+"="+adminToken)
			out, err := cmd.CombinedOutput()
			if code := cmd.ProcessState.ExitCode(); code != 1 {
				t.Fatalf("serve: exit %d (%v), want 1:\n%s", code, err, out)
			}
			for _, bad := range []string{"panic", "fatal error", "SIGBUS", "SIGSEGV", "unexpected fault address", "goroutine "} {
				if bytes.Contains(out, []byte(bad)) {
					t.Errorf("output has %q:\n%s", bad, out)
				}
			}
			lines := strings.Split(strings.TrimSpace(string(out)), "\n")
			if len(lines) != 1 {
				t.Fatalf("serve wrote %d lines, want one:\n%s", len(lines), out)
			}
			var line map[string]any
			if err := json.Unmarshal([]byte(lines[0]), &line); err != nil {
				t.Fatalf("not a JSON log line: %v\n%s", err, out)
			}
			t.Logf("%s", lines[0])
			problem, _ := line["problem"].(string)
			fix, _ := line["fix"].(string)
			if line["level"] != "ERROR" || line["path"] != q.queue || !strings.Contains(problem, tc.problem) ||
				!strings.Contains(fix, "smarthost queue salvage -path "+q.queue+" -out ") {
				t.Errorf("log line: %s", lines[0])
			}
			if hashFile(t, q.queue) != hash {
				t.Error("serve changed the damaged queue file")
			}
			if _, err := os.Stat(q.queue + ".compact"); err == nil {
				t.Error("serve started compacting the damaged file")
			}
		})
	}
}

// TestSalvageThenDeliver: a relay's queue file gets a damaged page of
// records; `smarthost queue salvage` copies the rest, spool files
// included, into a new file and names what it could not save; a relay
// started on the new file delivers every saved message, the spooled ones
// whole, and those it had to hold for checking once they are released.
func TestSalvageThenDeliver(t *testing.T) {
	t.Parallel()
	q := fillQueue(t, 40, 1500<<10, 1200<<10)
	var spooled []string
	for id, msg := range q.sent {
		if len(msg) > 1<<20 {
			spooled = append(spooled, id)
		}
	}
	// A page of records without the spooled messages' records.
	ps, leaves := leafPages(t, q.queue, "msgs")
	var page uint64
	var inPage []string
	for _, id := range slices.Sorted(maps.Keys(leaves)) {
		if !slices.ContainsFunc(leaves[id], func(k string) bool { return slices.Contains(spooled, k) }) {
			page, inPage = id, leaves[id]
			break
		}
	}
	if page == 0 {
		t.Fatal("every page of records holds a spooled message")
	}
	writeAt(t, q.queue, int64(page)*int64(ps)+8, []byte{0x04, 0x00})
	hash := hashFile(t, q.queue)

	newQueue := filepath.Join(t.TempDir(), "salvaged.db")
	cmd := exec.Command(binary, "queue", "salvage", "-path", q.queue, "-out", newQueue)
	out, err := cmd.CombinedOutput()
	code := cmd.ProcessState.ExitCode()
	t.Logf("salvage (exit %d, %v):\n%s", code, err, out)
	var lost, held []string
	saved := -1
	for _, line := range strings.Split(string(out), "\n") {
		if m := regexp.MustCompile(`^lost ([0-9a-f]{16}): `).FindStringSubmatch(line); m != nil {
			lost = append(lost, m[1])
		}
		if m := regexp.MustCompile(`^held ([0-9a-f]{16}): `).FindStringSubmatch(line); m != nil {
			held = append(held, m[1])
		}
		fmt.Sscanf(line, "saved %d messages", &saved)
	}
	if want := 1; len(lost) > 0 {
		if code != want {
			t.Errorf("exit %d with messages lost, want %d", code, want)
		}
	} else if code != 0 && code != 1 {
		t.Errorf("exit %d", code)
	}
	// Every record of the damaged page is named: lost, or held to check.
	for _, id := range inPage {
		if !slices.Contains(lost, id) && !slices.Contains(held, id) {
			t.Errorf("%s, whose record was in the damaged page, is neither lost nor held:\n%s", id, out)
		}
	}
	if saved+len(lost) != len(q.sent) {
		t.Errorf("saved %d and lost %d of %d", saved, len(lost), len(q.sent))
	}
	if hashFile(t, q.queue) != hash {
		t.Error("salvage changed the damaged file")
	}

	// The relay on the new file, the upstream up.
	data, err := os.ReadFile(q.cfg)
	if err != nil {
		t.Fatal(err)
	}
	data = bytes.Replace(data, []byte(`path = "`+q.queue+`"`), []byte(`path = "`+newQueue+`"`), 1)
	data = bytes.Replace(data, []byte(`retry_min = "1h"`), []byte(`retry_min = "1s"`), 1)
	if err := os.WriteFile(q.cfg, data, 0o600); err != nil {
		t.Fatal(err)
	}
	q.freeUp()
	up := startUpstream(t, q.pki, smtptest.Options{Addr: q.upAddr})
	r := startRelay(t, q.cfg)
	if out, err := queueCLI(t, r, adminToken, "flush"); err != nil {
		t.Fatalf("flush: %v\n%s", err, out)
	}
	up.WaitMessages(t, saved-len(held), 60*time.Second)
	for _, id := range held {
		if out, err := queueCLI(t, r, adminToken, "release", id); err != nil {
			t.Fatalf("release %s: %v\n%s", id, err, out)
		}
	}
	got := up.WaitMessages(t, saved, 60*time.Second)
	delivered := map[string]int{}
	for _, m := range got {
		id := queueIDOf(m.Data)
		delivered[id]++
		if msg, ok := q.sent[id]; !ok || !bytes.HasSuffix(m.Data, []byte(msg)) {
			t.Errorf("%s: delivered %d bytes, not the message submitted (%d bytes)", id, len(m.Data), len(msg))
		}
	}
	for _, id := range spooled {
		if delivered[id] != 1 {
			t.Errorf("spooled message %s delivered %d times", id, delivered[id])
		}
	}
	for _, id := range lost {
		if delivered[id] > 0 {
			t.Errorf("%s was reported lost but delivered", id)
		}
	}
	if len(delivered) != saved {
		t.Errorf("%d distinct messages delivered, %d saved", len(delivered), saved)
	}
	testwait.For(t, 20*time.Second, "an empty queue", func() bool { return len(listQueue(t, r)) == 0 })
}
