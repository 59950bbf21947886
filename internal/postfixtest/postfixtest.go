// Package postfixtest lays out a private Postfix instance (Debian's
// postfix): its own configuration, queue and data directories, and a
// master.cf with smtpd on one loopback address, for the tests and
// benchmarks that run Postfix next to smarthost. Its master must start as
// root; its daemons drop to the postfix user, which must be able to reach
// the directories.
package postfixtest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Dirs are an instance's directories.
type Dirs struct {
	Etc   string // config_directory: main.cf and master.cf
	Queue string // queue_directory
	Data  string // data_directory
}

// queueDirs is the queue_directory layout that `postfix check`
// (post-install create-missing) would make, with owners and modes as in
// Postfix's postfix-files: written here directly, because that check
// takes seconds.
var queueDirs = []struct {
	name     string
	mode     os.FileMode
	postdrop bool // group postdrop instead of root
}{
	{"active", 0o700, false}, {"bounce", 0o700, false}, {"corrupt", 0o700, false},
	{"defer", 0o700, false}, {"deferred", 0o700, false}, {"flush", 0o700, false},
	{"hold", 0o700, false}, {"incoming", 0o700, false}, {"private", 0o700, false},
	{"saved", 0o700, false}, {"trace", 0o700, false},
	{"maildrop", 0o730 | os.ModeSticky, true}, {"public", 0o710 | os.ModeSetgid, true},
}

// Layout makes dir/etc, dir/queue and dir/data, owned as Postfix wants
// them.
func Layout(dir string) (Dirs, error) {
	d := Dirs{Etc: filepath.Join(dir, "etc"), Queue: filepath.Join(dir, "queue"), Data: filepath.Join(dir, "data")}
	pfUser, err := user.Lookup("postfix")
	if err != nil {
		return d, fmt.Errorf("postfix user: %w", err)
	}
	postdrop, err := user.LookupGroup("postdrop")
	if err != nil {
		return d, fmt.Errorf("postdrop group: %w", err)
	}
	uid, _ := strconv.Atoi(pfUser.Uid)
	gid, _ := strconv.Atoi(postdrop.Gid)
	for _, p := range []string{d.Etc, d.Queue, d.Data, filepath.Join(d.Queue, "pid")} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			return d, err
		}
	}
	for _, q := range queueDirs {
		p := filepath.Join(d.Queue, q.name)
		g := 0
		if q.postdrop {
			g = gid
		}
		if err := os.Mkdir(p, 0o700); err != nil {
			return d, err
		}
		if err := os.Chown(p, uid, g); err != nil {
			return d, err
		}
		if err := os.Chmod(p, q.mode); err != nil {
			return d, err
		}
	}
	if err := os.Chown(d.Data, uid, 0); err != nil {
		return d, err
	}
	return d, os.Chmod(d.Data, 0o700)
}

// WriteConfig writes main.cf and master.cf into etc.
func WriteConfig(etc, mainCF, masterCF string) error {
	for name, text := range map[string]string{"main.cf": mainCF, "master.cf": masterCF} {
		if err := os.WriteFile(filepath.Join(etc, name), []byte(text), 0o644); err != nil {
			return err
		}
	}
	// Postfix rereads a configuration file modified within the last two
	// seconds until it is older, lest it read one half-written: date
	// ours back rather than wait.
	past := time.Now().Add(-time.Minute)
	for _, name := range []string{"main.cf", "master.cf"} {
		if err := os.Chtimes(filepath.Join(etc, name), past, past); err != nil {
			return err
		}
	}
	return nil
}

// MasterCF is Debian's master.cf without chroot, without the delivery
// agents a relay does not use, and with smtpd on addr only.
func MasterCF(addr string) string {
	return addr + ` inet n - n - - smtpd
pickup     unix  n - n 60    1 pickup
cleanup    unix  n - n -     0 cleanup
qmgr       unix  n - n 300   1 qmgr
tlsmgr     unix  - - n 1000? 1 tlsmgr
rewrite    unix  - - n -     - trivial-rewrite
bounce     unix  - - n -     0 bounce
defer      unix  - - n -     0 bounce
trace      unix  - - n -     0 bounce
verify     unix  - - n -     1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -     - proxymap
proxywrite unix  - - n -     1 proxymap
smtp       unix  - - n -     - smtp
relay      unix  - - n -     - smtp
showq      unix  n - n -     - showq
error      unix  - - n -     - error
retry      unix  - - n -     - error
discard    unix  - - n -     - discard
anvil      unix  - - n -     1 anvil
scache     unix  - - n -     1 scache
postlog    unix-dgram n - n - 1 postlogd
`
}

// LookSbin finds a program on PATH or, as Debian keeps Postfix's
// programs in sbin, which a user's PATH may lack, in /usr/sbin or
// /usr/local/sbin.
func LookSbin(name string) (string, error) {
	p, err := exec.LookPath(name)
	if err == nil {
		return p, nil
	}
	for _, dir := range []string{"/usr/sbin", "/usr/local/sbin"} {
		if _, e := os.Stat(filepath.Join(dir, name)); e == nil {
			return filepath.Join(dir, name), nil
		}
	}
	return "", err
}

// Master returns the path of Postfix's master program, in postconf's
// default daemon_directory.
func Master(postconf string) (string, error) {
	out, err := exec.Command(postconf, "-d", "-h", "daemon_directory").Output()
	if err != nil {
		return "", fmt.Errorf("postconf daemon_directory: %w", err)
	}
	dir, _, _ := strings.Cut(string(out), "\n")
	if dir == "" {
		return "", errors.New("postconf: no daemon_directory")
	}
	master := filepath.Join(dir, "master")
	if _, err := os.Stat(master); err != nil {
		return "", fmt.Errorf("postfix master: %w", err)
	}
	return master, nil
}

// MainCF is a null client's main.cf: Postfix's defaults, except that
// nothing is delivered locally and every recipient goes to relayhost, that
// smtpd listens on 127.0.0.1 for 127.0.0.0/8, and that the log goes to
// maillog (through postlogd, as in a container) with its lines prefixed by
// dir. extra, more settings, follows.
func MainCF(d Dirs, dir, maillog, myhostname, mydomain, relayhost, extra string) string {
	return fmt.Sprintf(`compatibility_level = 3.6
queue_directory = %s
data_directory = %s
mail_owner = postfix
setgid_group = postdrop
myhostname = %s
mydomain = %s
# Nothing is delivered locally: every recipient goes to the relayhost.
mydestination =
local_transport = error:local delivery is disabled
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = %s
maillog_file = %s
maillog_file_prefixes = %s
biff = no
`, d.Queue, d.Data, myhostname, mydomain, relayhost, maillog, dir) + extra
}

// Command is master for the instance at d, in the foreground (-s) as the
// caller's child, so that its PID is the caller's to stop; the daemons it
// forks are its children.
func Command(master string, d Dirs) *exec.Cmd {
	cmd := exec.Command(master, "-c", d.Etc, "-s")
	// Not a process group of its own: master calls setsid(), which a
	// group leader may not, and then leads a session of its own anyway.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	return cmd
}
