package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	msgauth "github.com/emersion/go-msgauth/dkim"
)

// TestDemo runs `smarthost demo` as the README says, sends the test message
// with the curl command line it prints, and finds the delivered message in
// the folder it names.
func TestDemo(t *testing.T) {
	t.Parallel()
	curl, err := exec.LookPath("curl")
	if err != nil {
		t.Fatal("curl is needed for this test (make test installs it)")
	}
	dir := t.TempDir()
	cmd := exec.Command(binary, "demo", "-listen", "127.0.0.1:0", "-http", "127.0.0.1:0", "-dir", dir)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() { waitErr = cmd.Wait(); close(exited) }()
	defer func() {
		cmd.Process.Signal(syscall.SIGKILL)
		<-exited
	}()

	var curlLine, deliveredDir, zoneLine string
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	timeout := time.After(60 * time.Second)
	for deliveredDir == "" {
		select {
		case line, ok := <-lines:
			if !ok {
				t.Fatalf("demo output ended early; stderr:\n%s", stderr.String())
			}
			line = strings.TrimSpace(line)
			if strings.HasPrefix(line, "curl ") {
				curlLine = line
			}
			if strings.HasPrefix(line, "demo._domainkey.example.com. IN TXT ") {
				zoneLine = line
			}
			if rest, ok := strings.CutPrefix(line, "Delivered messages appear in "); ok {
				deliveredDir = strings.TrimSuffix(rest, "/")
			}
		case <-timeout:
			t.Fatalf("demo printed no instructions; stderr:\n%s", stderr.String())
		}
	}
	go func() {
		for range lines {
		}
	}()
	if curlLine == "" {
		t.Fatal("no curl command line printed")
	}
	out, err := exec.Command("sh", "-c", strings.Replace(curlLine, "curl ", curl+" --silent --show-error ", 1)).CombinedOutput()
	if err != nil {
		t.Fatalf("%s\n%v: %s\nstderr:\n%s", curlLine, err, out, stderr.String())
	}

	deadline := time.Now().Add(30 * time.Second)
	for {
		files, _ := filepath.Glob(filepath.Join(deliveredDir, "*.eml"))
		if len(files) > 0 {
			data, err := os.ReadFile(files[0])
			if err != nil {
				t.Fatal(err)
			}
			for _, want := range []string{"Subject: Hello from smarthost", "(smarthost) with ESMTPSA id ", "It works"} {
				if !bytes.Contains(data, []byte(want)) {
					t.Errorf("delivered message lacks %q:\n%s", want, data)
				}
			}
			// The message verifies against the record the demo printed.
			var record strings.Builder
			for _, m := range regexp.MustCompile(`"([^"]*)"`).FindAllStringSubmatch(zoneLine, -1) {
				record.WriteString(m[1])
			}
			vs, err := msgauth.VerifyWithOptions(bytes.NewReader(data), &msgauth.VerifyOptions{
				LookupTXT: func(name string) ([]string, error) {
					if name != "demo._domainkey.example.com" {
						return nil, fmt.Errorf("unexpected lookup %s", name)
					}
					return []string{record.String()}, nil
				},
			})
			if err != nil || len(vs) != 1 || vs[0].Err != nil || vs[0].Domain != "example.com" {
				t.Errorf("demo signature against the printed record %q: %v %+v", zoneLine, err, vs)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing delivered to %s; stderr:\n%s", deliveredDir, stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		if waitErr != nil {
			t.Errorf("demo exit: %v", waitErr)
		}
	case <-time.After(20 * time.Second):
		t.Error("demo did not stop on SIGTERM")
	}
}

// TestDemoRemovesItsFolder: a demo started without -dir works in a new
// temporary folder, holding its private keys, and removes it when it
// stops; the folder it printed is then gone.
func TestDemoRemovesItsFolder(t *testing.T) {
	t.Parallel()
	tmp := t.TempDir()
	cmd := exec.Command(binary, "demo", "-listen", "127.0.0.1:0", "-http", "127.0.0.1:0")
	cmd.Env = append(os.Environ(), "TMPDIR="+tmp)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	sc := bufio.NewScanner(stdout)
	var delivered string
	for delivered == "" && sc.Scan() {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "Delivered messages appear in "); ok {
			delivered = strings.TrimSuffix(rest, "/")
		}
	}
	go io.Copy(io.Discard, stdout)
	if !strings.HasPrefix(delivered, tmp) {
		cmd.Process.Kill()
		t.Fatalf("the demo's folder %q is not under TMPDIR %s", delivered, tmp)
	}
	if entries, _ := os.ReadDir(tmp); len(entries) != 1 {
		t.Errorf("TMPDIR holds %d entries while the demo runs, want its folder", len(entries))
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("demo exit: %v", err)
		}
	case <-time.After(30 * time.Second):
		cmd.Process.Kill()
		t.Fatal("demo did not stop on SIGTERM")
	}
	if entries, _ := os.ReadDir(tmp); len(entries) != 0 {
		t.Errorf("the demo left %v in TMPDIR", entries)
	}
}
