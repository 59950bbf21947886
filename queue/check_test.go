package queue

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// queueFixture writes a queue file of n messages of 2 KB, enough for its
// buckets to have branch pages, closes it cleanly and returns its path.
func queueFixture(t testing.TB, n int) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "queue.db")
	s, err := Open(path, Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if err := benchFill(s, n); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	return path
}

// fileLayout is where things are in a bbolt file, found with bbolt itself
// and by reading the pages' headers from the file.
type fileLayout struct {
	pageSize int
	pages    int    // the high-water mark of the latest meta page
	freelist uint64 // its freelist page, or noFreelist
	latest   int    // 0 or 1: the meta page in use
	branches map[string][]uint64
	leaves   map[string][]uint64
}

func layoutOf(t *testing.T, path string) fileLayout {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	l := fileLayout{pageSize: db.Info().PageSize, branches: map[string][]uint64{}, leaves: map[string][]uint64{}}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var txid [2]uint64
	for i := range 2 {
		m := data[i*l.pageSize+pageHeaderSize:]
		txid[i] = binary.LittleEndian.Uint64(m[48:])
	}
	l.latest = 0
	if txid[1] > txid[0] {
		l.latest = 1
	}
	m := data[l.latest*l.pageSize+pageHeaderSize:]
	l.freelist, l.pages = binary.LittleEndian.Uint64(m[32:]), int(binary.LittleEndian.Uint64(m[40:]))
	err = db.View(func(tx *bolt.Tx) error {
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			queue := []uint64{uint64(b.Root())}
			for len(queue) > 0 && queue[0] != 0 {
				id := queue[0]
				queue = queue[1:]
				p := data[int(id)*l.pageSize:]
				count := int(binary.LittleEndian.Uint16(p[10:]))
				switch binary.LittleEndian.Uint16(p[8:]) {
				case branchPageFlag:
					l.branches[string(name)] = append(l.branches[string(name)], id)
					for i := range count {
						queue = append(queue, binary.LittleEndian.Uint64(p[pageHeaderSize+i*elemSize+8:]))
					}
				case leafPageFlag:
					l.leaves[string(name)] = append(l.leaves[string(name)], id)
				}
			}
			return nil
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// patch writes b into the file at off, in place.
func patch(t *testing.T, path string, off int64, b []byte) {
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

func le16(v uint16) []byte { return binary.LittleEndian.AppendUint16(nil, v) }
func le32(v uint32) []byte { return binary.LittleEndian.AppendUint32(nil, v) }
func le64(v uint64) []byte { return binary.LittleEndian.AppendUint64(nil, v) }

func randomBytes(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, 1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

func fileHash(t *testing.T, path string) [sha256.Size]byte {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(data)
}

// damages are the ways a queue file is damaged in the tests: each writes
// into the closed file at path, laid out as l.
var damages = []struct {
	name   string
	want   string // in the problem reported
	damage func(t *testing.T, path string, l fileLayout)
}{
	{"cut to half its pages", "cut short", func(t *testing.T, path string, l fileLayout) {
		if err := os.Truncate(path, int64(l.pages/2*l.pageSize)); err != nil {
			t.Fatal(err)
		}
	}},
	{"cut by one page", "cut short", func(t *testing.T, path string, l fileLayout) {
		if err := os.Truncate(path, int64((l.pages-1)*l.pageSize)); err != nil {
			t.Fatal(err)
		}
	}},
	{"leaf page flags", "neither a branch nor a leaf", func(t *testing.T, path string, l fileLayout) {
		patch(t, path, int64(l.leaves["msgs"][3])*int64(l.pageSize)+8, le16(freelistPageFlag))
	}},
	{"branch page flags", "neither a branch nor a leaf", func(t *testing.T, path string, l fileLayout) {
		patch(t, path, int64(l.branches["bodies"][0])*int64(l.pageSize)+8, le16(0x04))
	}},
	{"page number", "says it is page", func(t *testing.T, path string, l fileLayout) {
		id := l.leaves["bodies"][7]
		patch(t, path, int64(id)*int64(l.pageSize), le64(id+1))
	}},
	{"garbage in a branch page", "bucket bodies", func(t *testing.T, path string, l fileLayout) {
		patch(t, path, int64(l.branches["bodies"][0])*int64(l.pageSize)+pageHeaderSize, randomBytes(1, 256))
	}},
	{"garbage in a leaf page", "bucket msgs", func(t *testing.T, path string, l fileLayout) {
		patch(t, path, int64(l.leaves["msgs"][5])*int64(l.pageSize)+pageHeaderSize, randomBytes(2, l.pageSize-pageHeaderSize))
	}},
	{"branch pointing to itself", "reached twice", func(t *testing.T, path string, l fileLayout) {
		root := l.branches["bodies"][0]
		patch(t, path, int64(root)*int64(l.pageSize)+pageHeaderSize+elemSize+8, le64(root))
	}},
	{"overflow past the end", "runs over", func(t *testing.T, path string, l fileLayout) {
		patch(t, path, int64(l.leaves["msgs"][0])*int64(l.pageSize)+12, le32(0xFFFFFFF0))
	}},
	{"element count", "do not fit", func(t *testing.T, path string, l fileLayout) {
		patch(t, path, int64(l.leaves["msgs"][1])*int64(l.pageSize)+10, le16(0xFFFE))
	}},
	{"freelist count", "freelist", func(t *testing.T, path string, l fileLayout) {
		if l.freelist == noFreelist {
			t.Fatal("the fixture has no freelist written")
		}
		patch(t, path, int64(l.freelist)*int64(l.pageSize)+10, le16(0x7FFF))
	}},
	{"both meta pages zeroed", "neither meta page", func(t *testing.T, path string, l fileLayout) {
		patch(t, path, 0, make([]byte, 2*l.pageSize))
	}},
	{"random bytes", "neither meta page", func(t *testing.T, path string, l fileLayout) {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		patch(t, path, 0, randomBytes(3, int(fi.Size())))
	}},
}

// TestOpenDamaged: a queue file cut short or with damaged pages is
// refused by Open with a *DamagedError that names the file and the
// problem, and is left exactly as it was: not a byte written, no
// compaction, no freelist, no claim cleared. On main, the cut files crash
// the process with SIGBUS, and the damaged pages panic in bbolt or are
// served.
func TestOpenDamaged(t *testing.T) {
	for _, d := range damages {
		t.Run(d.name, func(t *testing.T) {
			path := queueFixture(t, 300)
			d.damage(t, path, layoutOf(t, path))
			before, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			hash := fileHash(t, path)

			s, err := Open(path, Options{Logger: slog.New(slog.DiscardHandler)})
			if err == nil {
				s.Close()
				t.Fatal("Open served the damaged file")
			}
			var dmg *DamagedError
			if !errors.Is(err, ErrDamaged) || !errors.As(err, &dmg) {
				t.Fatalf("Open: %v, want a DamagedError", err)
			}
			if dmg.Path != path || !strings.Contains(err.Error(), path) || !strings.Contains(dmg.Problem, d.want) {
				t.Errorf("Open: %v; want the path and %q", err, d.want)
			}
			t.Logf("%v", err)

			if fileHash(t, path) != hash {
				t.Error("Open changed the damaged file")
			}
			after, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if !after.ModTime().Equal(before.ModTime()) || after.Size() != before.Size() {
				t.Errorf("file modified: %v %d bytes, was %v %d", after.ModTime(), after.Size(), before.ModTime(), before.Size())
			}
			if _, err := os.Stat(path + compactSuffix); err == nil {
				t.Error("Open started a compaction")
			}
			// A second Open finds the same: nothing was marked checked.
			if _, err := Open(path, Options{Logger: slog.New(slog.DiscardHandler)}); !errors.Is(err, ErrDamaged) {
				t.Errorf("second Open: %v, want ErrDamaged", err)
			}
		})
	}
}

// TestOpenOneMetaPageLost: a torn write of a meta page (a crash during a
// commit) leaves the other, previous one; bbolt uses it, and so does the
// check, which then reads every page.
func TestOpenOneMetaPageLost(t *testing.T) {
	path := queueFixture(t, 300)
	l := layoutOf(t, path)
	patch(t, path, int64(l.latest*l.pageSize), make([]byte, l.pageSize))
	var logs syncBuffer
	s, err := Open(path, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatalf("Open with one meta page left: %v", err)
	}
	defer s.Close()
	if !strings.Contains(logs.String(), "checked every page") {
		t.Errorf("log %q: want a check of every page", logs.String())
	}
	if _, _, err := s.List(); err != nil {
		t.Fatal(err)
	}
}

// TestOpenCheckPolicy: Open checks every page unless the file is the one
// the last Close left, unchanged since; after a crash it checks them all.
func TestOpenCheckPolicy(t *testing.T) {
	path := queueFixture(t, 50)
	open := func(step string, wantFull bool) *Store {
		t.Helper()
		var logs syncBuffer
		s, err := Open(path, Options{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
		if err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		if full := strings.Contains(logs.String(), "checked every page"); full != wantFull {
			t.Errorf("%s: checked every page: %v, want %v (log %q)", step, full, wantFull, logs.String())
		}
		if _, err := os.Stat(path + cleanSuffix); err == nil {
			t.Errorf("%s: the clean record is still there while the file is open", step)
		}
		return s
	}
	// The fixture was closed cleanly.
	s := open("after Close", false)
	put(t, s, newMessage("a@example.net"), "body")
	// A crash: the process dies without Close.
	s.commit.close()
	if err := s.db.Close(); err != nil {
		t.Fatal(err)
	}
	s = open("after a crash", true)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Changed after Close, even to the same bytes: its change time moves.
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	s = open("after a write by someone else", true)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Copied from elsewhere, with the record: another inode.
	if err := os.Rename(path, path+".old"); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	s = open("a copy", true)
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	s = open("after Close again", false)
	s.Close()
}

// TestCheckAgreesWithBbolt damages a real queue file at random, a byte or
// a whole page at a time, 200 times: the check never panics, and
// whatever it lets through, bbolt opens, checks (Tx.Check) and reads from
// end to end without a panic, a fault or a problem.
func TestCheckAgreesWithBbolt(t *testing.T) {
	path := queueFixture(t, 120)
	l := layoutOf(t, path)
	orig, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	passed, refused := 0, 0
	for seed := range uint64(200) {
		rng := rand.New(rand.NewPCG(seed, 2))
		data := bytes.Clone(orig)
		page := rng.IntN(l.pages)
		p := data[page*l.pageSize : (page+1)*l.pageSize]
		what := ""
		switch rng.IntN(4) {
		case 0: // a byte of the header or the first elements
			i := rng.IntN(64)
			p[i] ^= byte(1 + rng.IntN(255))
			what = fmt.Sprintf("byte %d of page %d", i, page)
		case 1: // a byte anywhere in the page
			i := rng.IntN(len(p))
			p[i] ^= byte(1 + rng.IntN(255))
			what = fmt.Sprintf("byte %d of page %d", i, page)
		case 2:
			copy(p, randomBytes(seed, len(p)))
			what = fmt.Sprintf("page %d random", page)
		case 3:
			clear(p)
			what = fmt.Sprintf("page %d zeroed", page)
		}
		f, problems, err := readBoltFile(bytes.NewReader(data), int64(len(data)))
		if err == nil && len(problems) == 0 {
			w := &boltWalk{f: f}
			w.walk() // no recover: a panic fails the test
			problems = w.problems
		}
		if err != nil || len(problems) > 0 {
			refused++
			continue
		}
		passed++
		copyPath := filepath.Join(dir, fmt.Sprintf("q%d.db", seed))
		if err := os.WriteFile(copyPath, data, 0o600); err != nil {
			t.Fatal(err)
		}
		if errs := readWithBbolt(t, copyPath, page < 2); len(errs) > 0 {
			t.Errorf("%s: the check passed it, bbolt finds: %v", what, errs)
		}
	}
	t.Logf("200 damaged files: %d refused, %d passed and read by bbolt", refused, passed)
	if refused < 50 || passed < 50 {
		t.Errorf("%d refused, %d passed: the damage is not varied enough to show anything", refused, passed)
	}
}

// readWithBbolt opens the file with bbolt as a relay would serve it: it
// reads every key and value, runs bbolt's own check (unless metaDamaged:
// Tx.Check asserts the headers of both meta pages, which bbolt otherwise
// never reads, and a torn meta page is what a crash may leave), then
// opens it read-write as Open does and commits a write. It returns what
// went wrong.
func readWithBbolt(t *testing.T, path string, metaDamaged bool) (errs []error) {
	t.Helper()
	defer func() {
		if p := recover(); p != nil {
			errs = append(errs, fmt.Errorf("panic: %v", p))
		}
	}()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, Timeout: time.Second})
	if err != nil {
		return []error{err}
	}
	err = db.View(func(tx *bolt.Tx) error {
		if !metaDamaged {
			for err := range tx.Check() {
				errs = append(errs, err)
			}
		}
		var n int
		return tx.ForEach(func(name []byte, b *bolt.Bucket) error {
			return b.ForEach(func(k, v []byte) error {
				n += len(k) + len(v)
				return nil
			})
		})
	})
	db.Close()
	if err != nil {
		return append(errs, err)
	}
	// NoSync: the file is thrown away; what matters is that bbolt can write it.
	db, err = bolt.Open(path, 0o600, &bolt.Options{Timeout: time.Second, FreelistType: bolt.FreelistMapType, NoFreelistSync: true, NoSync: true})
	if err != nil {
		return append(errs, err)
	}
	defer db.Close()
	err = db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists([]byte("test"))
		if err != nil {
			return err
		}
		return b.Put([]byte("k"), bytes.Repeat([]byte("v"), 10000))
	})
	if err != nil {
		errs = append(errs, err)
	}
	return errs
}

// FuzzCheckFile: whatever the bytes of the file, the check returns
// problems or none, and never panics, loops or runs out of memory. The
// seeds are real queue files.
func FuzzCheckFile(f *testing.F) {
	dir := f.TempDir()
	for i, n := range []int{0, 3, 40} {
		path := filepath.Join(dir, fmt.Sprintf("q%d.db", i))
		s, err := Open(path, Options{Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			f.Fatal(err)
		}
		// Small bodies keep the file small; 40 records make the msgs
		// bucket a branch over leaves.
		for j := range n {
			put(f, s, newMessage(fmt.Sprintf("rcpt%d@example.net", j)), "Subject: seed\r\n\r\nbody\r\n")
		}
		if i == 2 {
			// A crash leaves no freelist written.
			s.commit.close()
			s.db.Close()
		} else if err := s.Close(); err != nil {
			f.Fatal(err)
		}
		data, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		// Only the pages in use: bbolt grows the file ahead of them.
		if bf, _, err := readBoltFile(bytes.NewReader(data), int64(len(data))); err == nil {
			data = data[:bf.pages()*uint64(bf.meta.pageSize)]
		}
		f.Add(data)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		// Without checkBoltFile's recover: a panic fails the target.
		bf, _, err := readBoltFile(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			return
		}
		(&boltWalk{f: bf, stopAfter: maxProblems}).walk()
		(&boltWalk{f: bf}).top()
		// As Salvage reads it: past every problem, a bucket set aside.
		w := &boltWalk{f: bf, visit: func(string, []byte, []byte) {}, skip: func(b string) bool { return b == "bodies" }}
		w.start()
		w.tree("", bf.meta.root, nil, nil, 0)
		if v, ok := w.skipped["bodies"]; ok {
			w.bucket("bodies", v, bf.meta.root, 1)
		}
	})
}

// TestCheckFaultOnMap: the check reads the file through a memory map; if
// the file is cut short while it reads (by a process that ignores the
// lock), the fault on the map is a problem reported, not a crash.
func TestCheckFaultOnMap(t *testing.T) {
	path := queueFixture(t, 300)
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	data, unmap := mapFile(f, fi.Size())
	defer unmap()
	if data == nil {
		t.Skip("the file cannot be mapped here")
	}
	if problems, _ := checkBoltFile(f, data, fi.Size(), true); len(problems) > 0 {
		t.Fatalf("sound file: %v", problems)
	}
	// Cut under the map: reading its second half now faults (SIGBUS).
	if err := os.Truncate(path, fi.Size()/4); err != nil {
		t.Fatal(err)
	}
	problems, _ := checkBoltFile(f, data, fi.Size(), true)
	if len(problems) == 0 || !strings.Contains(problems[len(problems)-1], "the check failed") {
		t.Fatalf("problems %v, want the fault reported", problems)
	}
	t.Logf("%v", problems[len(problems)-1])
}
