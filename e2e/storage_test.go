package e2e

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	bolt "go.etcd.io/bbolt"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// TestStorageFullDiskExt4 runs the full-disk scenario on a loop-mounted
// ext4 image, which behaves like a real disk: bbolt grows its file with a
// sparse truncate, and the blocks run out only when pages are written.
func TestStorageFullDiskExt4(t *testing.T) {
	t.Parallel()
	testFullDisk(t, mountSmallFS(t, "ext4"))
}

// TestStorageFullDiskTmpfs runs it on a size-limited tmpfs, where a read
// fault on a hole of a mapped file needs a new page: if bbolt read any
// page of its file that was never written, the relay would die of SIGBUS.
func TestStorageFullDiskTmpfs(t *testing.T) {
	t.Parallel()
	testFullDisk(t, mountSmallFS(t, "tmpfs"))
}

// mountSmallFS mounts a fresh small filesystem of the given kind and
// returns its mount point; it is unmounted in t.Cleanup, after the relays
// started later (their cleanups run first). Where mounting is not
// permitted the test is skipped: relay's TestStorageFailureNever250
// covers the reply with an injected error.
func mountSmallFS(t *testing.T, kind string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skipf("mounting a %s filesystem needs root; running as uid %d", kind, os.Geteuid())
	}
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	var mount *exec.Cmd
	switch kind {
	case "ext4":
		img := filepath.Join(dir, "disk.img")
		f, err := os.Create(img)
		if err != nil {
			t.Fatal(err)
		}
		err = f.Truncate(32 << 20)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
			t.Skipf("mkfs.ext4 %s: %v: %s", img, err, bytes.TrimSpace(out))
		}
		mount = exec.Command("mount", "-o", "loop", img, mnt)
	case "tmpfs":
		mount = exec.Command("mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", mnt)
	default:
		t.Fatalf("unknown filesystem %q", kind)
	}
	if out, err := mount.CombinedOutput(); err != nil {
		t.Skipf("%s: %v: %s", strings.Join(mount.Args, " "), err, bytes.TrimSpace(out))
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mnt, err, bytes.TrimSpace(out))
		}
	})
	return mnt
}

// fillDisk writes a file in dir until the filesystem is full, then gives
// room bytes back, and returns the file's path.
func fillDisk(t *testing.T, dir string, room int64) string {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := bytes.Repeat([]byte("filler\n"), 1<<17)
	var size int64
	for {
		n, err := f.Write(chunk)
		size += int64(n)
		if errors.Is(err, syscall.ENOSPC) {
			break
		}
		if err != nil {
			t.Fatalf("filling %s: %v", dir, err)
		}
	}
	if size < room {
		t.Fatalf("filesystem %s had only %d bytes free, want more than %d", dir, size, room)
	}
	if err := f.Truncate(size - room); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	return path
}

// freeBytes is what the filesystem holding dir has left for root.
func freeBytes(t *testing.T, dir string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bfree) * st.Bsize
}

// sizedMessage is a message of about size bytes whose Subject is token.
func sizedMessage(token string, size int) string {
	var b strings.Builder
	b.Grow(size + 128)
	fmt.Fprintf(&b, "From: app@example.com\r\nTo: bob@example.net\r\nSubject: %s\r\n\r\n", token)
	for i := 0; b.Len() < size; i++ {
		fmt.Fprintf(&b, "%08d %s\r\n", i, token)
	}
	return b.String()
}

var tokenSubject = regexp.MustCompile(`(?m)^Subject: (full-[0-9]+)\r$`)

// fullDiskRun is the state of the full-disk scenario: what the relay
// answered to each submission, by token.
type fullDiskRun struct {
	t        *testing.T
	pki      *testpki.PKI
	r        *relay
	s        *submitter
	n        int
	accepted map[string]string // token → queue ID
	refused  []string          // tokens answered 452 4.3.1
}

// submit sends one message of size bytes and returns its reply: nil for
// 250, the reply otherwise. Anything but an SMTP reply (the connection
// broke: the relay crashed) fails the test.
func (fd *fullDiskRun) submit(size int) *smtp.SMTPError {
	t := fd.t
	t.Helper()
	if fd.s == nil {
		fd.s = connect(t, fd.r.addr, fd.pki)
		// Guard against a hang, not a slow machine.
		fd.s.c.CommandTimeout = 30 * time.Second
		fd.s.c.SubmissionTimeout = 30 * time.Second
	}
	fd.n++
	token := fmt.Sprintf("full-%d", fd.n)
	id, err := fd.s.send("app@example.com", []string{"bob@example.net"}, sizedMessage(token, size))
	if err == nil {
		fd.accepted[token] = id
		return nil
	}
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		select {
		case <-fd.r.exited:
			t.Fatalf("relay died on %s (%d bytes): %s\n%s", token, size, fd.r.cmd.ProcessState, tail(fd.r.logPath, 40))
		default:
		}
		t.Fatalf("%s (%d bytes): %v", token, size, err)
	}
	if se.Code == 452 {
		fd.refused = append(fd.refused, token)
	}
	return se
}

// wantStorageReply fails unless se is exactly the reply SPEC.md gives for
// a full disk: nothing of the cause (errno, file path) reaches the client.
func wantStorageReply(t *testing.T, what string, se *smtp.SMTPError) {
	t.Helper()
	if se == nil {
		t.Fatalf("%s: 250 on a full disk", what)
	}
	if se.Code != 452 || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 1}) || se.Message != "Insufficient system storage, try again later" {
		t.Fatalf("%s: %d %v %q, want 452 4.3.1 Insufficient system storage, try again later", what, se.Code, se.EnhancedCode, se.Message)
	}
}

// restart stops the relay cleanly and starts it again on the same queue.
func (fd *fullDiskRun) restart(cfg string) {
	if fd.s != nil {
		fd.s.close()
		fd.s = nil
	}
	fd.r.stop()
	fd.r = startRelay(fd.t, cfg)
}

// testFullDisk fills the filesystem holding queue.path while the relay
// runs: the relay answers 452 4.3.1 and never 250 to what it cannot
// store, logs the cause, keeps running, starts again on the full disk,
// accepts again once space returns, and delivers every message it
// accepted and none it refused.
func testFullDisk(t *testing.T, mnt string) {
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	// While the disk is full the upstream defers every message, so that
	// no delivery frees pages in the queue file and "full" stays full.
	var holding atomic.Bool
	up.SetDataReply(func(string, []string, []byte) *smtp.SMTPError {
		if holding.Load() {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "held by the test"}
		}
		return nil
	})
	dir := t.TempDir() // config and logs stay off the small filesystem
	cfg := writeConfig(t, relayConfig{Dir: dir, PKI: pki, UpstreamAddr: up.Addr()})
	queuePath := filepath.Join(mnt, "queue.db")
	data, err := os.ReadFile(cfg)
	if err != nil {
		t.Fatal(err)
	}
	data = bytes.Replace(data, []byte(`path = "`+dir+`/queue.db"`), []byte(`path = "`+queuePath+`"`), 1)
	if !bytes.Contains(data, []byte(queuePath)) {
		t.Fatal("queue.path not found in the config")
	}
	if err := os.WriteFile(cfg, data, 0o600); err != nil {
		t.Fatal(err)
	}

	fd := &fullDiskRun{t: t, pki: pki, r: startRelay(t, cfg), accepted: map[string]string{}}

	// Space left: plain acceptance and delivery.
	for _, size := range []int{100 << 10, 200 << 10} {
		if se := fd.submit(size); se != nil {
			t.Fatalf("before the disk is full: %v", se)
		}
	}
	up.WaitMessages(t, 2, 30*time.Second)

	// Full, but for a little room: the relay stores until nothing fits,
	// then refuses. Sizes climb from 100 KB to 1 MB.
	holding.Store(true)
	const room = 600 << 10
	filler := fillDisk(t, mnt, room)
	t.Logf("filled %s: %d bytes free", mnt, freeBytes(t, mnt))
	sizes := []int{100 << 10, 250 << 10, 400 << 10, 550 << 10, 700 << 10, 850 << 10, 1000 << 10}
	var firstRefused *smtp.SMTPError
	okWhileFilling := 0
	for i := 0; firstRefused == nil; i++ {
		if i == 40 {
			t.Fatalf("40 submissions on a full disk and no 452: %d accepted", okWhileFilling)
		}
		size := sizes[i%len(sizes)]
		se := fd.submit(size)
		if se == nil {
			okWhileFilling++
			continue
		}
		wantStorageReply(t, fmt.Sprintf("submission of %d bytes", size), se)
		firstRefused = se
	}
	if okWhileFilling == 0 {
		t.Error("nothing accepted in the last 600 KB: the relay refused before the disk was full")
	}
	// Full: every further submission is refused, and refused again on a
	// new connection. Each is at least as large as any before, so none
	// fits in blocks a failed commit already got.
	for i := range 3 {
		if i == 2 {
			fd.s.close()
			fd.s = nil
		}
		wantStorageReply(t, "submission on a full disk", fd.submit(1000<<10))
	}
	t.Logf("while filling: %d accepted, then %d refused", okWhileFilling, len(fd.refused))

	// The log names the cause, once per refusal.
	var failures []map[string]any
	for _, line := range fd.r.logLines() {
		if line["msg"] == "queue write failed" {
			failures = append(failures, line)
		}
	}
	if len(failures) != len(fd.refused) {
		t.Errorf("%d queue write failures logged for %d refusals", len(failures), len(fd.refused))
	}
	for _, line := range failures {
		if e, _ := line["error"].(string); !strings.Contains(e, "no space left on device") {
			t.Errorf("logged failure does not name the cause: %v", line)
		}
	}
	if len(failures) > 0 {
		t.Logf("logged: %v", failures[0]["error"])
	}

	// A restart on the full disk: the queue opens and still refuses.
	fd.restart(cfg)
	wantStorageReply(t, "submission after a restart on a full disk", fd.submit(1000<<10))

	// Space returns: the relay accepts again without a restart.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	holding.Store(false)
	for _, size := range []int{100 << 10, 500 << 10, 1000 << 10} {
		if se := fd.submit(size); se != nil {
			t.Fatalf("after space returned, %d bytes: %v", size, se)
		}
	}

	// After one more restart on the once-full disk, every accepted
	// message is delivered and no refused one is.
	fd.restart(cfg)
	delivered := map[string]int{}
	deadline := time.Now().Add(60 * time.Second)
	for {
		clear(delivered)
		for _, m := range up.Messages() {
			if sm := tokenSubject.FindSubmatch(m.Data); sm != nil {
				delivered[string(sm[1])]++
			}
		}
		missing := 0
		for token := range fd.accepted {
			if delivered[token] == 0 {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d accepted messages not delivered within 60s", missing, len(fd.accepted))
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, token := range fd.refused {
		if delivered[token] > 0 {
			t.Errorf("%s was refused with 452 but delivered", token)
		}
	}
	dups := 0
	for _, n := range delivered {
		dups += n - 1
	}
	t.Logf("submissions %d: accepted %d, refused with 452 %d; delivered %d (%d duplicates)",
		fd.n, len(fd.accepted), len(fd.refused), len(delivered), dups)

	// The file bbolt left behind is consistent: no page both free and in
	// use after the failed commits.
	fd.r.stop()
	db, err := bolt.Open(queuePath, 0o600, &bolt.Options{ReadOnly: true, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.View(func(tx *bolt.Tx) error {
		for err := range tx.Check() {
			t.Errorf("queue file check: %v", err)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
