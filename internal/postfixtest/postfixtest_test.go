package postfixtest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestMasterCF(t *testing.T) {
	master := MasterCF("127.0.0.1:2526")
	if !strings.HasPrefix(master, "127.0.0.1:2526 inet n - n - - smtpd\n") {
		t.Errorf("smtpd not on the loopback address:\n%s", master)
	}
	for line := range strings.Lines(master) {
		if f := strings.Fields(line); len(f) >= 5 && f[4] != "n" {
			t.Errorf("service %s is chrooted", f[0])
		}
	}
}

func TestLayoutAndConfig(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the queue's directories are owned by the postfix user")
	}
	dir := t.TempDir()
	d, err := Layout(dir)
	if err != nil {
		t.Skipf("no Postfix installed: %v", err)
	}
	for _, q := range queueDirs {
		fi, err := os.Stat(filepath.Join(d.Queue, q.name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode()&(os.ModePerm|os.ModeSticky|os.ModeSetgid) != q.mode {
			t.Errorf("%s: mode %v, want %v", q.name, fi.Mode(), q.mode)
		}
	}
	if err := WriteConfig(d.Etc, "biff = no\n", MasterCF("127.0.0.1:2526")); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(d.Etc, "main.cf"))
	if err != nil {
		t.Fatal(err)
	}
	if time.Since(fi.ModTime()) < 2*time.Second {
		t.Errorf("main.cf dated %v: Postfix would wait for it to age", fi.ModTime())
	}
}
