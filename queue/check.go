package queue

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"runtime/debug"
	"time"
)

// ErrDamaged is wrapped by the error of Open for a queue file that fails
// its check (a *DamagedError): it is neither served nor written.
var ErrDamaged = errors.New("queue file is damaged")

// DamagedError is the error of Open for a damaged queue file. The file
// has not been written; OpenSalvage and Salvage.CopyTo copy what can
// still be read of it into a new one.
type DamagedError struct {
	Path    string
	Problem string // the first problem found
	More    int    // how many more were found
}

// Error names the file and the first problem.
func (e *DamagedError) Error() string {
	s := fmt.Sprintf("queue: %s is damaged: %s", e.Path, e.Problem)
	if e.More > 0 {
		s += fmt.Sprintf(" (and %d more %s)", e.More, plural(e.More, "problem", "problems"))
	}
	return s
}

// Unwrap makes errors.Is(err, ErrDamaged) true.
func (e *DamagedError) Unwrap() error { return ErrDamaged }

// maxProblems is how many problems a check of the file collects before
// it stops: the first is reported, the count tells how far it goes.
const maxProblems = 20

// cleanSuffix names the file that Close writes beside the queue file
// once it has closed it: the file's identity, size and change times then.
const cleanSuffix = ".clean"

// cleanPrefix starts the content of the clean record, and names its format.
const cleanPrefix = "closed v1 "

// When Open checks the file. Reading every page of a queue of a million
// messages (6 GB) takes seconds even from the page cache (3 s on a 2-core
// VM: BenchmarkOpen, restart=crash), against 20 ms for a whole restart
// otherwise, so every page is checked only when the file may have changed
// since a process that checked it stopped cleanly:
//
//   - Close records the file's device, inode, size, modification and
//     change times once bbolt has closed it (cleanSuffix). Open reads the
//     record, removes it, and compares it with the file. Any write to the
//     file, by bbolt or by anyone else (a truncate, a copy over it, a
//     byte changed in place), moves its change time, which no system call
//     can set back; a file copied or restored from elsewhere is another
//     inode. If all match, the file is the one a checked, cleanly closed
//     store left, and Open checks only what bbolt reads at once: the meta
//     pages against the file's size, the freelist and the root page.
//   - Otherwise (a crash, a kill, a power cut, a file changed or put
//     there by hand, no record, or a system without these times) Open
//     reads and checks every page first.
//
// What this misses is a change within the file system's timestamp tick
// (a few milliseconds) after Close, and damage below the file system
// after a clean stop (a disk returning other bytes than were written),
// which only a check of every page at every start would find, at seconds
// per start.

// checkOpen checks the queue file f, of which fi is the state, before
// bbolt opens it, and returns nil or the *DamagedError. An empty file is
// new: bbolt writes its first pages.
func checkOpen(f *os.File, fi fs.FileInfo, path string, log *slog.Logger) error {
	if fi.Size() == 0 {
		return nil
	}
	full := !closedCleanly(path, fi)
	start := time.Now()
	data, unmap := mapFile(f, fi.Size())
	defer unmap()
	problems, pages := checkBoltFile(f, data, fi.Size(), full)
	if len(problems) > 0 {
		return &DamagedError{Path: path, Problem: problems[0], More: len(problems) - 1}
	}
	if full {
		log.Info("queue: checked every page of the queue file: the last process did not close it, or it changed since",
			"path", path, "pages", pages, "duration", time.Since(start).Round(time.Millisecond).String())
	}
	return nil
}

// checkBoltFile checks the bbolt file r of size bytes, mapped as data if
// not nil: every page with full, else what bbolt reads at open. It returns
// the problems found, none for a sound file, and the number of pages in
// use. It never panics, and a fault on the map (the file cut short by
// someone while it is read) is a problem too, not a crash.
func checkBoltFile(r io.ReaderAt, data []byte, size int64, full bool) (problems []string, pages uint64) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		p := recover()
		if _, fault := p.(interface{ Addr() uintptr }); fault {
			problems = append(problems, "the check failed: the file was cut short while it was read; is another process writing it?")
		} else if p != nil {
			problems = append(problems, fmt.Sprintf("the check failed: %v", p))
		}
	}()
	f, problems, err := readBoltFile(r, size)
	if err != nil {
		return []string{err.Error()}, 0
	}
	f.data = data
	if len(problems) > 0 {
		return problems, f.pages()
	}
	w := &boltWalk{f: f, stopAfter: maxProblems}
	if full {
		w.walk()
	} else {
		w.top()
	}
	return w.problems, f.pages()
}

// closedCleanly reports whether the record that Close left beside path
// describes the file as it is now (fi). The record is removed: it holds
// for one Open only.
func closedCleanly(path string, fi fs.FileInfo) bool {
	rec := path + cleanSuffix
	b, err := readSmall(rec, 512)
	if errors.Is(err, fs.ErrNotExist) {
		return false
	}
	os.Remove(rec)
	stamp := fileStamp(fi)
	return err == nil && stamp != "" && string(b) == cleanPrefix+stamp+"\n"
}

// recordClean writes the clean record for the file at path, which the
// caller has just closed. A record not written costs the next Open a full
// check, nothing else.
func recordClean(path string) {
	fi, err := os.Stat(path)
	if err != nil {
		return
	}
	if stamp := fileStamp(fi); stamp != "" {
		os.WriteFile(path+cleanSuffix, []byte(cleanPrefix+stamp+"\n"), 0o600)
	}
}

// readSmall reads the file at path, of at most limit bytes.
func readSmall(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err == nil && int64(len(b)) > limit {
		err = errors.New("too large")
	}
	return b, err
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
