// Package e2e runs the built smarthost binary as a subprocess against real
// SMTP clients and go-smtp upstreams on loopback.
package e2e

import (
	"bytes"
	"crypto/tls"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"text/template"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"
	"golang.org/x/sys/unix"

	"smarthost/internal/testpg"
	"smarthost/internal/testpki"
)

// binary is the smarthost executable built once for all tests, in a
// directory removed after them. It is built without -race, as deployed:
// the race detector multiplies the memory of every goroutine (the
// memory tests read the relay's RSS) and slows every test that runs it,
// while the relay's concurrency is raced by the unit tests of its
// packages. The tests themselves may still run with -race.
var binary string

// parallel is how many tests run at once unless -parallel says: most
// wait on relays, upstreams, timers and peers far more than they
// compute, so more of them than there are cores fit. The tests that
// measure time, memory or descriptors, or that load the machine, do
// not call t.Parallel and run alone, before the others.
const parallel = 6

func TestMain(m *testing.M) {
	flag.Parse()
	explicit := false
	flag.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "test.parallel" })
	if !explicit {
		flag.Set("test.parallel", strconv.Itoa(parallel))
	}
	dir, err := os.MkdirTemp("", "smarthost-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "smarthost")
	build := exec.Command("go", "build", "-o", binary, "../cmd/smarthost")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building smarthost:", err)
		os.Exit(1)
	}
	code := m.Run()
	testpg.CloseShared()
	os.RemoveAll(dir)
	os.Exit(code)
}

const (
	userName     = "e2e"
	userPassword = "e2e-secret-password"
	upUser       = "relay@example.com"
	upPassword   = "upstream-app-password"
	upPassEnv    = "E2E_UPSTREAM_PASSWORD"
	adminToken   = "e2e-admin-token"
	adminEnv     = "E2E_ADMIN_TOKEN"
)

// relayConfig fills config.tmpl.
type relayConfig struct {
	Dir          string
	PKI          *testpki.PKI
	UserHash     string
	UpstreamAddr string
	UpstreamTLS  string
	RetryMin     string
	RetryMax     string   // default "2s"
	MaxSize      string   // default "10MB"
	MaxAge       string   // default "1h"
	MaxConns     int      // upstream max_connections, default 4
	AllowedFrom  []string // default *@example.com
	UserExtra    string   // lines added to the e2e [[user]]
	QueueExtra   string   // lines added to [queue]
	UpExtra      string   // lines added to the [[upstream]]
	Extra        string
	LimitsExtra  string // lines added to [limits]
}

var configTmpl = template.Must(template.New("config").Parse(`
hostname = "relay.e2e"
log_format = "json"
log_level = "debug"

[queue]
path = "{{.Dir}}/queue.db"
retry_min = "{{.RetryMin}}"
retry_max = "{{.RetryMax}}"
max_age = "{{.MaxAge}}"
{{.QueueExtra}}

[tls]
cert_file = "{{.PKI.CertFile}}"
key_file = "{{.PKI.KeyFile}}"

[[listen]]
address = "127.0.0.1:0"
tls = "starttls"
auth = "required"

[limits]
max_message_size = "{{.MaxSize}}"
{{.LimitsExtra}}

[[user]]
name = "e2e"
password_hash = "{{.UserHash}}"
allowed_from = [{{range $i, $a := .AllowedFrom}}{{if $i}}, {{end}}"{{$a}}"{{end}}]
{{.UserExtra}}

[[upstream]]
name = "up"
address = "{{.UpstreamAddr}}"
tls = "{{.UpstreamTLS}}"
username = "relay@example.com"
password_env = "E2E_UPSTREAM_PASSWORD"
ca_file = "{{.PKI.CAFile}}"
max_connections = {{.MaxConns}}
{{.UpExtra}}

[[route]]
from_domain = "*"
upstreams = ["up"]

[http]
address = "127.0.0.1:0"
admin_token_env = "E2E_ADMIN_TOKEN"
{{.Extra}}
`))

// userHash is the e2e user's password hash, the same in every
// configuration written: a reload that changes it logs the user's open
// sessions out.
var userHash = sync.OnceValue(func() string {
	hash, err := bcrypt.GenerateFromPassword([]byte(userPassword), bcrypt.MinCost)
	if err != nil {
		panic(err)
	}
	return string(hash)
})

// writeConfig writes a configuration into a new directory and returns its path.
func writeConfig(t *testing.T, rc relayConfig) string {
	t.Helper()
	if rc.Dir == "" {
		rc.Dir = t.TempDir()
	}
	if rc.RetryMin == "" {
		rc.RetryMin = "1s"
	}
	if rc.RetryMax == "" {
		rc.RetryMax = "2s"
	}
	if rc.MaxAge == "" {
		rc.MaxAge = "1h"
	}
	if rc.MaxConns == 0 {
		rc.MaxConns = 4
	}
	if rc.MaxSize == "" {
		rc.MaxSize = "10MB"
	}
	if len(rc.AllowedFrom) == 0 {
		rc.AllowedFrom = []string{"*@example.com"}
	}
	if rc.UpstreamTLS == "" {
		rc.UpstreamTLS = "implicit"
	}
	rc.UserHash = userHash()
	var buf bytes.Buffer
	if err := configTmpl.Execute(&buf, rc); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(rc.Dir, "config.toml")
	if err := os.WriteFile(path, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// relay is a running smarthost process.
type relay struct {
	t       *testing.T
	cmd     *exec.Cmd
	logPath string
	addr    string   // first submission listener
	addrs   []string // every submission listener
	http    string   // admin API base URL
	exited  chan struct{}

	logMu   sync.Mutex
	logRead int64            // bytes of the log parsed into logSeen
	logSeen []map[string]any // its JSON lines so far
}

// startRelay runs `smarthost serve` and waits until it listens.
func startRelay(t *testing.T, configPath string) *relay {
	t.Helper()
	logPath := filepath.Join(filepath.Dir(configPath), fmt.Sprintf("relay-%d.log", time.Now().UnixNano()))
	logFile, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(binary, "serve", "-config", configPath)
	cmd.Env = append(os.Environ(), upPassEnv+"="+upPassword, adminEnv+"="+adminToken)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logFile.Close()
	r := &relay{t: t, cmd: cmd, logPath: logPath, exited: make(chan struct{})}
	go func() { cmd.Wait(); close(r.exited) }()
	t.Cleanup(func() {
		r.kill()
		if t.Failed() {
			t.Logf("relay log %s:\n%s", logPath, tail(logPath, 60))
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if line := r.findLog("smarthost started"); line != nil {
			addrs, _ := line["listeners"].([]any)
			if len(addrs) > 0 {
				for _, a := range addrs {
					r.addrs = append(r.addrs, a.(string))
				}
				r.addr = r.addrs[0]
				if h, ok := line["http"].(string); ok {
					r.http = "http://" + h
				}
				return r
			}
		}
		select {
		case <-r.exited:
			t.Fatalf("relay exited at start:\n%s", tail(logPath, 40))
		case <-time.After(20 * time.Millisecond):
		}
	}
	t.Fatalf("relay did not start:\n%s", tail(logPath, 40))
	return nil
}

// findLog returns the last JSON log line whose msg is msg.
func (r *relay) findLog(msg string) map[string]any {
	var found map[string]any
	for _, line := range r.logLines() {
		if line["msg"] == msg {
			found = line
		}
	}
	return found
}

// logLines returns the JSON lines of the relay's log so far. Tests poll
// it every few milliseconds while the relay logs at debug level, so each
// call parses only the lines completed since the last.
func (r *relay) logLines() []map[string]any {
	r.logMu.Lock()
	defer r.logMu.Unlock()
	if f, err := os.Open(r.logPath); err == nil {
		f.Seek(r.logRead, io.SeekStart)
		data, _ := io.ReadAll(f)
		f.Close()
		data = data[:bytes.LastIndexByte(data, '\n')+1] // a line being written waits for the next call
		r.logRead += int64(len(data))
		for line := range bytes.Lines(data) {
			var m map[string]any
			if json.Unmarshal(line, &m) == nil {
				if key, dup := duplicateKey(line); dup {
					// Log pipelines that refuse duplicate keys drop such lines.
					r.t.Errorf("log line with the key %q twice: %s", key, line)
				}
				r.logSeen = append(r.logSeen, m)
			}
		}
	}
	return r.logSeen[:len(r.logSeen):len(r.logSeen)]
}

// duplicateKey reports a key that appears twice in one object of a JSON
// text, as a strict decoder would refuse it.
func duplicateKey(data []byte) (string, bool) {
	dec := json.NewDecoder(bytes.NewReader(data))
	var walk func() (string, bool)
	walk = func() (string, bool) {
		tok, err := dec.Token()
		if err != nil {
			return "", false
		}
		switch tok {
		case json.Delim('{'):
			seen := map[string]bool{}
			for dec.More() {
				k, err := dec.Token()
				if err != nil {
					return "", false
				}
				key, _ := k.(string)
				if seen[key] {
					return key, true
				}
				seen[key] = true
				if key, dup := walk(); dup {
					return key, true
				}
			}
			dec.Token() // }
		case json.Delim('['):
			for dec.More() {
				if key, dup := walk(); dup {
					return key, true
				}
			}
			dec.Token() // ]
		}
		return "", false
	}
	return walk()
}

// waitLog waits for a log line with msg and the given attribute values.
func (r *relay) waitLog(msg string, attrs map[string]string, timeout time.Duration) map[string]any {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
	lines:
		for _, line := range r.logLines() {
			if line["msg"] != msg {
				continue
			}
			for k, v := range attrs {
				if fmt.Sprint(line[k]) != v {
					continue lines
				}
			}
			return line
		}
		time.Sleep(20 * time.Millisecond)
	}
	r.t.Fatalf("no log %q %v within %s:\n%s", msg, attrs, timeout, tail(r.logPath, 40))
	return nil
}

// kill ends the process with SIGKILL and waits for it.
func (r *relay) kill() {
	if r.cmd.Process != nil {
		r.cmd.Process.Signal(syscall.SIGKILL)
	}
	<-r.exited
}

// stop sends SIGTERM and waits for a clean exit.
func (r *relay) stop() {
	r.t.Helper()
	r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.exited:
	case <-time.After(30 * time.Second):
		r.t.Fatal("relay did not stop after SIGTERM")
	}
	if code := r.cmd.ProcessState.ExitCode(); code != 0 {
		r.t.Fatalf("relay exit code %d", code)
	}
}

func tail(path string, n int) string {
	data, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// submitter is an authenticated SMTP client of the relay.
type submitter struct {
	c *smtp.Client
}

func connect(t *testing.T, addr string, pki *testpki.PKI) *submitter {
	t.Helper()
	c, err := smtp.DialStartTLS(addr, pki.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", userName, userPassword)); err != nil {
		c.Close()
		t.Fatal(err)
	}
	return &submitter{c: c}
}

var queuedAs = regexp.MustCompile(`^2\.0\.0 OK queued as ([0-9a-f]+)$`)

// send submits one message and returns the queue ID from the 250 reply.
func (s *submitter) send(from string, to []string, msg string) (string, error) {
	if err := s.c.Mail(from, nil); err != nil {
		return "", err
	}
	for _, r := range to {
		if err := s.c.Rcpt(r, nil); err != nil {
			return "", err
		}
	}
	w, err := s.c.Data()
	if err != nil {
		return "", err
	}
	if _, err := io.WriteString(w, msg); err != nil {
		return "", err
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return "", err
	}
	m := queuedAs.FindStringSubmatch(resp.StatusText)
	if m == nil {
		return "", fmt.Errorf("unexpected 250 text %q", resp.StatusText)
	}
	return m[1], nil
}

func (s *submitter) close() { s.c.Quit(); s.c.Close() }

// reserveAddr returns a loopback address where connections are refused
// (an upstream that is down), held until free is called, which lets the
// upstream listen there, or the test ends. It is held by a TCP socket
// bound to it without listening: a listener closed at once would leave
// its port to whichever test running in parallel binds next.
func reserveAddr(t *testing.T) (addr string, free func()) {
	t.Helper()
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	free = func() { once.Do(func() { unix.Close(fd) }) }
	t.Cleanup(free)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("127.0.0.1:%d", sa.(*unix.SockaddrInet4).Port), free
}

// queueIDOf finds the relay's queue ID in the Received: field it added.
var receivedID = regexp.MustCompile(`by relay\.e2e \(smarthost\) with ESMTPSA id ([0-9a-f]+);`)

func queueIDOf(data []byte) string {
	m := receivedID.FindSubmatch(data)
	if m == nil {
		return ""
	}
	return string(m[1])
}

// rawClient speaks SMTP line by line over an authenticated TLS session,
// for tests that must control every byte.
type rawClient struct {
	t  *testing.T
	tp *textproto.Conn
	w  io.Writer
}

func dialRaw(t *testing.T, addr string, pki *testpki.PKI) *rawClient {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(30 * time.Second))
	c := &rawClient{t: t, tp: textproto.NewConn(conn), w: conn}
	if code, msg := c.read(); code != 220 {
		t.Fatalf("greeting %d %s", code, msg)
	}
	c.expect(250, "EHLO raw.test")
	c.expect(220, "STARTTLS")
	tc := tls.Client(conn, pki.ClientTLS())
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	c.tp, c.w = textproto.NewConn(tc), tc
	c.expect(250, "EHLO raw.test")
	c.expect(235, "AUTH PLAIN %s", base64.StdEncoding.EncodeToString([]byte("\x00"+userName+"\x00"+userPassword)))
	return c
}

func (c *rawClient) read() (int, string) {
	code, msg, err := c.tp.ReadResponse(0)
	if err != nil && code == 0 {
		return 0, err.Error()
	}
	return code, msg
}

func (c *rawClient) expect(want int, format string, args ...any) {
	c.t.Helper()
	if err := c.tp.PrintfLine(format, args...); err != nil {
		c.t.Fatal(err)
	}
	if code, msg := c.read(); code != want {
		c.t.Fatalf("%s: %d %s, want %d", fmt.Sprintf(format, args...), code, msg, want)
	}
}

func (c *rawClient) write(s string) {
	c.t.Helper()
	if _, err := io.WriteString(c.w, s); err != nil {
		c.t.Fatal(err)
	}
}
