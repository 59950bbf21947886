package main

import (
	"bytes"
	"crypto/rand"
	"crypto/rsa"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	msgdkim "github.com/emersion/go-msgauth/dkim"

	"smarthost/dkim"
)

func TestParseFlags(t *testing.T) {
	o, err := parseFlags([]string{"-smarthost", "/x/smarthost", "-smtpload", "/x/smtpload"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(o.ProdSizes, []int{10 << 10, 100 << 10}) || !slices.Equal(o.ProdSessions, []int{10}) {
		t.Errorf("production-shaped defaults: sizes %v sessions %v", o.ProdSizes, o.ProdSessions)
	}
	if !slices.Equal(o.Sizes, []int{1024, 10240, 102400, 1 << 20, 10 << 20}) || !slices.Equal(o.Sessions, []int{1, 10, 50}) || o.Messages != 2000 || o.LargeMB != 200 {
		t.Errorf("defaults: sizes %v sessions %v n %d", o.Sizes, o.Sessions, o.Messages)
	}
	// Every target by default but those on a PostgreSQL queue, which
	// need its server programs and double the matrix's time.
	var want []string
	for _, tg := range targets {
		if !strings.HasPrefix(tg.Name, "smarthost-pg") {
			want = append(want, tg.Name)
		}
	}
	if !slices.Equal(o.Targets, want) {
		t.Errorf("default targets %v, want %v", o.Targets, want)
	}

	o, err = parseFlags([]string{"-quick", "-smarthost", "s", "-smtpload", "l", "-targets", "postfix,smarthost"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(o.Sizes, []int{1024}) || !slices.Equal(o.Sessions, []int{10}) || o.Messages != 500 || !slices.Equal(o.ProdSizes, []int{10 << 10}) {
		t.Errorf("-quick: sizes %v sessions %v n %d production sizes %v", o.Sizes, o.Sessions, o.Messages, o.ProdSizes)
	}
	if !slices.Equal(o.Targets, []string{"postfix", "smarthost"}) {
		t.Errorf("-targets: %v", o.Targets)
	}
	if o, err = parseFlags([]string{"-quick", "-n", "50", "-smarthost", "s", "-tls-sizes", ""}, io.Discard); err != nil || o.Messages != 50 || o.ProdSizes != nil {
		t.Errorf("-quick -n 50: n %d, %v", o.Messages, err)
	}

	for _, bad := range [][]string{
		{"-targets", "sendmail", "-smarthost", "s"},
		{"-targets", "smarthost"}, // no binary
		{"-sizes", "1XB", "-smarthost", "s"},
		{"-sessions", "0", "-smarthost", "s"},
		{"-n", "0", "-smarthost", "s"},
		{"-large-mb", "0", "-smarthost", "s"},
		{"-smarthost", "s"}, // the production-shaped runs need smtpload
		{"-smarthost", "s", "-smtpload", "l", "-tls-sizes", "1XB"},
		{"-smarthost", "s", "-smtpload", "l", "-tls-sessions", "0"},
		{"-smarthost", "s", "extra"},
		{"-memory", "-targets", "direct"},       // -memory measures smarthost: the binary is needed
		{"-baseline", "old", "-smarthost", "s"}, // a baseline is for -memory only
	} {
		if _, err := parseFlags(bad, io.Discard); err == nil {
			t.Errorf("parseFlags(%q) accepted", bad)
		}
	}
	if _, err := parseFlags([]string{"-targets", "direct,postfix", "-tls-sizes", ""}, io.Discard); err != nil {
		t.Errorf("targets without smarthost need no binary: %v", err)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int{"1KB": 1024, "100kb": 102400, "2MB": 2 << 20, "512": 512} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, bad := range []string{"KB", "1GB", "x"} {
		if _, err := parseSize(bad); err == nil {
			t.Errorf("parseSize(%q) accepted", bad)
		}
	}
	for n, want := range map[int]string{1024: "1 KB", 102400: "100 KB", 2 << 20: "2 MB", 1500: "1500 B"} {
		if got := formatSize(n); got != want {
			t.Errorf("formatSize(%d) = %q, want %q", n, got, want)
		}
	}
}

// probeMessage is what smtp-source sends: a few header fields and size
// bytes of body in CRLF lines, the last one ended too.
func probeMessage(size int) []byte {
	var b bytes.Buffer
	b.WriteString("From: <bench@example.com>\r\nTo: <rcpt@example.net>\r\nDate: Sun, 22 Nov 2026 16:00:00 +0000\r\n\r\n")
	for n := 0; n < size; {
		line := min(80, size-n)
		b.WriteString(strings.Repeat("X", max(0, line-2)))
		if line >= 2 {
			b.WriteString("\r\n")
		}
		n += line
	}
	b.WriteString("\r\n")
	return b.Bytes()
}

func TestCheckProbe(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	record, err := dkim.RecordValue(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	const size = 4096
	plain := probeMessage(size)
	var signed bytes.Buffer
	if err := msgdkim.Sign(&signed, bytes.NewReader(plain), &msgdkim.SignOptions{Domain: dkimDomain, Selector: dkimSelector, Signer: key}); err != nil {
		t.Fatal(err)
	}
	tampered := bytes.Replace(signed.Bytes(), []byte("XXXX\r\n"), []byte("XXXY\r\n"), 1)
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	otherRecord, _ := dkim.RecordValue(other.Public())

	tests := []struct {
		name   string
		msg    []byte
		size   int
		signed bool
		record string
		ok     bool
	}{
		{"unsigned as expected", plain, size, false, record, true},
		{"signed as expected", signed.Bytes(), size, true, record, true},
		{"signature missing", plain, size, true, record, false},
		{"signed but should not be", signed.Bytes(), size, false, record, false},
		{"body changed in transit", tampered, size, true, record, false},
		{"signed with another key", signed.Bytes(), size, true, otherRecord, false},
		{"body cut short", plain[:len(plain)-100], size, false, record, false},
		{"no body", []byte("From: <a@example.com>\r\n"), size, false, record, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := checkProbe(tt.msg, tt.size, tt.signed, tt.record)
			if (err == nil) != tt.ok {
				t.Errorf("checkProbe = %v, want ok %v", err, tt.ok)
			}
		})
	}
}

func TestPostfixMainCF(t *testing.T) {
	cf := postfixMainCF("/w/queue", "/w/data", "/w", "/w/maillog", "127.0.0.1:2525", "")
	for _, want := range []string{"relayhost = [127.0.0.1]:2525\n", "mynetworks = 127.0.0.0/8\n", "mydestination =\n", "queue_directory = /w/queue\n", "maillog_file_prefixes = /w\n", "message_size_limit = 26214400\n"} {
		if !strings.Contains(cf, want) {
			t.Errorf("main.cf lacks %q:\n%s", want, cf)
		}
	}
	if strings.Contains(cf, "milter") {
		t.Error("main.cf without DKIM names a milter")
	}
	cf = postfixMainCF("/w/queue", "/w/data", "/w", "/w/maillog", "127.0.0.1:2525", "inet:127.0.0.1:8891")
	if !strings.Contains(cf, "smtpd_milters = inet:127.0.0.1:8891\n") {
		t.Errorf("main.cf with DKIM lacks the milter:\n%s", cf)
	}
}

func TestSmarthostConfig(t *testing.T) {
	type cfg struct {
		Queue  struct{ Path string }
		Listen []struct {
			Address, TLS, Auth string
			TrustedNetworks    []string `toml:"trusted_networks"`
		}
		Upstream []struct {
			Address, TLS   string
			MaxConnections int `toml:"max_connections"`
		}
		DKIM   []struct{ Domain, Selector, KeyFile string } `toml:"dkim"`
		HTTP   struct{ Address string }
		Limits struct {
			PerIP   int    `toml:"max_connections_per_ip"`
			MaxSize string `toml:"max_message_size"`
		}
	}
	for _, withDKIM := range []bool{false, true} {
		var c cfg
		text := smarthostConfig("/w", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", 20, "/w/k.key", withDKIM, memoryLimits, "")
		if _, err := toml.Decode(text, &c); err != nil {
			t.Fatalf("config does not decode: %v\n%s", err, text)
		}
		if len(c.Listen) != 1 || c.Listen[0].Address != "127.0.0.1:1" || c.Listen[0].TLS != "none" || c.Listen[0].Auth != "none" ||
			!slices.Equal(c.Listen[0].TrustedNetworks, []string{"127.0.0.0/8"}) {
			t.Errorf("listener: %+v", c.Listen)
		}
		if len(c.Upstream) != 1 || c.Upstream[0].Address != "127.0.0.1:3" || c.Upstream[0].MaxConnections != 20 {
			t.Errorf("upstream: %+v", c.Upstream)
		}
		// Every session comes from 127.0.0.1: no per-address limit.
		if c.Limits.PerIP != 0 || c.Limits.MaxSize != "30MB" || !strings.Contains(text, "max_connections_per_ip = 0") {
			t.Errorf("limits: %+v", c.Limits)
		}
		if c.HTTP.Address != "127.0.0.1:2" || c.Queue.Path != "/w/queue.db" {
			t.Errorf("http %q, queue %q", c.HTTP.Address, c.Queue.Path)
		}
		if got := len(c.DKIM); (got == 1) != withDKIM || (withDKIM && c.DKIM[0].Domain != dkimDomain) {
			t.Errorf("dkim %v: %+v", withDKIM, c.DKIM)
		}
	}
}

// Over 100 KB a run sends what -large-mb holds, at least two messages a
// session, never more than -n; its warm-up is one message a session.
func TestMessagesPerSize(t *testing.T) {
	b := &Bench{opts: Options{Messages: 2000, LargeMB: 200}}
	for _, tt := range []struct {
		size, sessions, n, warm int
	}{
		{1 << 10, 1, 2000, 20},
		{100 << 10, 50, 2000, 100},
		{1 << 20, 1, 200, 1},
		{1 << 20, 50, 200, 50},
		{10 << 20, 1, 20, 1},
		{10 << 20, 10, 20, 10},
		{10 << 20, 50, 100, 50},
		{101 << 10, 10, 2000, 10}, // 200 MB holds more than -n
	} {
		pt := Point{Size: tt.size, Sessions: tt.sessions}
		if n, w := b.messages(pt), b.warmup(pt); n != tt.n || w != tt.warm {
			t.Errorf("%s × %d: %d messages after %d warm-up, want %d after %d", formatSize(tt.size), tt.sessions, n, w, tt.n, tt.warm)
		}
	}
	b.opts.Warmup = 5
	if w := b.warmup(Point{Size: 10 << 20, Sessions: 50}); w != 5 {
		t.Errorf("-warmup 5: %d", w)
	}
}

// The cost table puts CPU per MB of body and peak RSS beside each other
// for every relay, and a dash where a run failed or did not happen.
func TestCostTable(t *testing.T) {
	pt := Point{Size: 1 << 20, Sessions: 10}
	results := []Result{
		{Target: "direct", Point: pt, Messages: 200, Arrived: 200, Elapsed: time.Second},
		{Target: "postfix", Point: pt, Messages: 200, Arrived: 200, Elapsed: 4 * time.Second, CPU: 3 * time.Second, PeakRSS: 90 << 20},
		{Target: "smarthost", Point: pt, Messages: 200, Arrived: 200, Elapsed: 2 * time.Second, CPU: 500 * time.Millisecond, PeakRSS: 30 << 20},
		{Target: "smarthost-dkim", Point: pt, Messages: 200, Arrived: 10, Err: "sink: 10 of 200 messages arrived"},
	}
	chosen := []Target{targets[0], targets[1], targets[3], targets[4]}
	table := costTable(chosen, results, []int{1 << 20}, []int{10})
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != 3 {
		t.Fatalf("%d lines:\n%s", len(lines), table)
	}
	cells := func(line string) []string { return strings.Split(strings.Trim(line, "| "), " | ") }
	head, row := cells(lines[0]), cells(lines[2])
	want := map[string]string{
		"size": "1 MB", "sessions": "10",
		"postfix CPU ms/MB": "15.0", "smarthost CPU ms/MB": "2.5", "smarthost+dkim CPU ms/MB": "–",
		"postfix peak RSS MB": "90", "smarthost peak RSS MB": "30", "smarthost+dkim peak RSS MB": "–",
	}
	if len(head) != len(want) {
		t.Errorf("columns %v, want the %d of %v (no direct)", head, len(want), want)
	}
	for i, col := range head {
		if row[i] != want[col] {
			t.Errorf("%s = %q, want %q", col, row[i], want[col])
		}
	}
}

func TestResultsTable(t *testing.T) {
	pt := Point{Size: 1024, Sessions: 10}
	results := []Result{
		{Target: "direct", Point: pt, Messages: 1000, Arrived: 1000, Elapsed: 400 * time.Millisecond},
		{Target: "postfix", Point: pt, Messages: 1000, Arrived: 1000, Elapsed: 4 * time.Second, CPU: 3 * time.Second, PeakMem: 60 << 20},
		{Target: "smarthost", Point: pt, Messages: 1000, Arrived: 1000, Elapsed: time.Second, CPU: 500 * time.Millisecond, PeakMem: 20 << 20},
		{Target: "smarthost-dkim", Point: pt, Messages: 1000, Arrived: 990, Err: "sink: 990 of 1000 messages arrived"},
	}
	chosen := []Target{targets[0], targets[1], targets[3], targets[4]}
	table := resultsTable(chosen, results, []int{1024}, []int{10, 50})
	lines := strings.Split(strings.TrimSpace(table), "\n")
	if len(lines) != 4 { // heading, rule, two points
		t.Fatalf("%d lines:\n%s", len(lines), table)
	}
	cells := func(line string) []string {
		var c []string
		for _, f := range strings.Split(strings.Trim(line, "| "), " | ") {
			c = append(c, strings.TrimSpace(f))
		}
		return c
	}
	head, row, missing := cells(lines[0]), cells(lines[2]), cells(lines[3])
	get := func(col string) string {
		i := slices.Index(head, col)
		if i < 0 {
			t.Fatalf("no column %q in %v", col, head)
		}
		return row[i]
	}
	for col, want := range map[string]string{
		"direct msgs/s": "2500", "postfix msgs/s": "250", "smarthost msgs/s": "1000",
		"smarthost+dkim msgs/s": "FAIL (990/1000)",
		"postfix CPU ms/msg":    "3.00", "smarthost CPU ms/msg": "0.50", "smarthost+dkim CPU ms/msg": "–",
		"postfix peak MB": "60", "smarthost peak MB": "20",
		"smarthost / postfix": "4.00×",
	} {
		if got := get(col); got != want {
			t.Errorf("%s = %q, want %q", col, got, want)
		}
	}
	if slices.Contains(head, "smarthost+dkim / postfix+dkim") {
		t.Error("a DKIM ratio without postfix+dkim in the run")
	}
	for i, c := range missing[2:] {
		if c != "–" {
			t.Errorf("point not run: column %s = %q, want –", head[i+2], c)
		}
	}
}

// The whole benchmark, small: every target whose programs this machine
// has (bench/run installs them; without smtp-source and smtp-sink there
// is nothing to drive), through the real command line, report and all.
func TestEndToEnd(t *testing.T) {
	var b Bench
	if err := b.findTools(false, false); err != nil {
		t.Skipf("Postfix's test tools are not installed (bench/run installs them): %v", err)
	}
	names := []string{"direct", "smarthost", "smarthost-dkim"}
	if b.findTools(true, true) == nil {
		names = append(names, "postfix", "postfix-dkim")
	}
	bin := filepath.Join(t.TempDir(), "smarthost")
	build := exec.Command("go", "build", "-o", bin, "smarthost/cmd/smarthost")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	load := filepath.Join(t.TempDir(), "smtpload")
	if out, err := exec.Command("go", "build", "-o", load, "smarthost/cmd/smtpload").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	work := t.TempDir()
	// Postfix's daemons, as the postfix user, must reach their queue
	// under the test's folders, which are private.
	for d := work; d != os.TempDir() && d != filepath.Dir(d); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	report := filepath.Join(work, "report.md")
	var stdout, stderr bytes.Buffer
	code := run([]string{"-smarthost", bin, "-smtpload", load, "-targets", strings.Join(names, ","), "-sizes", "1KB", "-sessions", "3",
		"-n", "40", "-warmup", "6", "-tls-sizes", "2KB", "-tls-sessions", "3", "-workdir", filepath.Join(work, "w"), "-o", report}, &stdout, &stderr)
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, stderr.String())
	}
	written, err := os.ReadFile(report)
	if err != nil || !bytes.Equal(written, stdout.Bytes()) {
		t.Errorf("-o file differs from stdout (%v)", err)
	}
	out := stdout.String()
	if strings.Contains(out, "FAIL") || strings.Contains(out, "## Problems") {
		t.Errorf("a run failed:\n%s", out)
	}
	for _, want := range []string{"smarthost: delivered intact, unsigned", "smarthost+dkim: delivered intact, RSA-2048 DKIM signature verifies",
		"production-shaped relay carried one probe message to a capture server: sent with STARTTLS and AUTH, delivered over verified TLS, RSA-2048 DKIM signature verifies"} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q", want)
		}
	}
	// Each run's row in the details: every message arrived.
	for _, name := range names {
		label := targets[slices.IndexFunc(targets, func(t Target) bool { return t.Name == name })].Label
		if !strings.Contains(out, "| "+label+" | 1 KB | 3 | 40 | 40 | ") {
			t.Errorf("no complete run of %s:\n%s", name, out)
		}
	}
	// Both production-shaped runs complete, and the tax between them.
	for _, label := range prodLabels {
		if !strings.Contains(out, "| "+label+" | 2 KB | 3 | 40 | 40 | ") {
			t.Errorf("no complete run of %s:\n%s", label, out)
		}
	}
	if !regexp.MustCompile(`\| 2 KB \| 3 \| \d+ \| \d+ \| \d\.\d\d× \|`).MatchString(out) {
		t.Errorf("no production-shaped row with a throughput tax:\n%s", out)
	}
	// Nothing the benchmark started is still running.
	all, err := allProcs()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range all {
		if p.PPID == os.Getpid() && p.State != 'Z' {
			t.Errorf("child %d still running after the benchmark", p.PID)
		}
	}
}

// TestPostfixProblem: a maillog line about the mail is trouble; Postfix's
// warning that the file system clock runs ahead of its own is about the
// host, and is not.
func TestPostfixProblem(t *testing.T) {
	for line, want := range map[string]bool{
		"Dec 05 09:14:43 postfix postfix/smtp[1]: 4ABC: to=<rcpt@example.net>, relay=127.0.0.1[127.0.0.1]:2525, status=sent (250 Ok)":       false,
		"Dec 05 09:14:43 postfix postfix/smtp[1]: 4ABC: to=<rcpt@example.net>, relay=none, status=deferred (connect to 127.0.0.1: refused)": true,
		"Dec 05 09:14:43 postfix postfix/cleanup[1]: warning: milter unix:/x/opendkim.sock: can't read SMFIC_OPTNEG reply packet":           true,
		"Dec 05 09:14:43 postfix postfix/cleanup[17661]: warning: file system clock is 1 seconds ahead of local clock":                      false,
		"Dec 05 09:14:43 postfix postfix/cleanup[17661]: warning: resetting file time stamps - this hurts performance":                      false,
	} {
		if got := postfixProblem(line); got != want {
			t.Errorf("postfixProblem(%q) = %v, want %v", line, got, want)
		}
	}
}
