package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/emersion/go-smtp"

	"smarthost/cmd/smarthost/internal/config/configtest"
	"smarthost/internal/smtptest"
	"smarthost/relay/upstream"
)

var updateGolden = flag.Bool("update", false, "rewrite testdata/check-upstream/*.golden from the output")

const (
	checkLogin    = "relay@example.com"
	checkPassword = "app-password-0123"
)

// checkUpstreams are the upstreams of the golden test, in configuration
// order, each named after its golden file.
var checkUpstreams = []string{"good", "wrong-tls", "bad-password", "bad-sender"}

// checkConfig starts the four fake upstreams of acceptance test 4 and
// writes a configuration naming them:
//
//   - good: implicit TLS, AUTH, accepts any sender;
//   - wrong-tls: configured for implicit TLS, on a STARTTLS server's port;
//   - bad-password: refuses the configured password (535);
//   - bad-sender: refuses every sender but the login (553 5.7.1 at MAIL).
//
// It returns the configuration's path and the servers' ports.
func checkConfig(t *testing.T) (path string, ports []string) {
	t.Helper()
	f := configtest.NewFiles(t)
	tlsCfg := f.PKI.ServerTLS()
	start := func(opts smtptest.Options) string {
		opts.DataReply = func(string, []string, []byte) *smtp.SMTPError {
			t.Error("check-upstream sent DATA")
			return nil
		}
		return smtptest.Start(t, opts).Addr()
	}
	good := start(smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: tlsCfg, Username: checkLogin, Password: checkPassword})
	wrongTLS := start(smtptest.Options{TLS: smtptest.TLSStartTLS, TLSConfig: tlsCfg, Username: checkLogin, Password: checkPassword})
	badPassword := start(smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: tlsCfg, Username: checkLogin, Password: "another-password"})
	badSender := start(smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: tlsCfg, Username: checkLogin, Password: checkPassword,
		MailReply: func(from string) *smtp.SMTPError {
			if from != checkLogin {
				return &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
					Message: "Sender address rejected: not owned by auth user"}
			}
			return nil
		}})

	pw := configtest.WriteFile(t, t.TempDir(), "upstream-password", checkPassword+"\n")
	var ups strings.Builder
	for i, addr := range []string{good, wrongTLS, badPassword, badSender} {
		_, port, _ := net.SplitHostPort(addr)
		ports = append(ports, port)
		fmt.Fprintf(&ups, `[[upstream]]
name = %q
address = %q
tls = "implicit"
username = %q
password_file = %q
ca_file = %q

`, checkUpstreams[i], addr, checkLogin, pw, f.PKI.CAFile)
	}
	text := f.Config(map[string]string{
		"upstream": ups.String(),
		"route": `[[route]]
from_domain = "example.com"
upstreams = ["good", "wrong-tls", "bad-password", "bad-sender"]`,
	})
	return configtest.WriteFile(t, t.TempDir(), "config.toml", text), ports
}

// volatile are the parts of the output that change from run to run,
// besides the servers' ports.
var volatile = []struct {
	re   *regexp.Regexp
	with string
}{
	{regexp.MustCompile(`\d{4}-\d{2}-\d{2}`), "DATE"},
	// The suite depends on the CPU's AES support.
	{regexp.MustCompile(`TLS_[A-Z0-9_]+`), "CIPHER"},
}

// normalize replaces what changes from run to run: the servers' ports
// (and only those: "port 587" in a hint stays), dates and cipher suites.
func normalize(s string, ports []string) string {
	for _, p := range ports {
		s = regexp.MustCompile(`(:|port )`+p+`\b`).ReplaceAllString(s, "${1}PORT")
	}
	for _, v := range volatile {
		s = v.re.ReplaceAllString(s, v.with)
	}
	return s
}

func runCheck(t *testing.T, args ...string) (stdout, stderr string, code int) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(append([]string{"check-upstream"}, args...), strings.NewReader(""), &out, &errb)
	return out.String(), errb.String(), code
}

// golden compares got with testdata/check-upstream/name.golden, or
// rewrites the file with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", "check-upstream", name+".golden")
	if *updateGolden {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s:\n--- got\n%s--- want\n%s", path, got, want)
	}
}

func TestCheckUpstreamGolden(t *testing.T) {
	cfg, ports := checkConfig(t)
	flags := []string{"-config", cfg, "-from", "app@example.com", "-to", "someone@example.net", "-timeout", "10s"}

	outputs := make([]string, len(checkUpstreams))
	for i, name := range checkUpstreams {
		t.Run(name, func(t *testing.T) {
			// The name may come before or after the flags.
			stdout, stderr, code := runCheck(t, append([]string{name}, flags...)...)
			wantCode := 1
			if name == "good" {
				wantCode = 0
			}
			if code != wantCode || stderr != "" {
				t.Errorf("exit %d, want %d; stderr:\n%s", code, wantCode, stderr)
			}
			outputs[i] = normalize(stdout, ports)
			golden(t, name, outputs[i])
			if strings.Contains(stdout, checkPassword) {
				t.Errorf("the output shows the password:\n%s", stdout)
			}
		})
	}

	t.Run("all", func(t *testing.T) {
		stdout, stderr, code := runCheck(t, flags...)
		if code != 1 || stderr != "" {
			t.Errorf("exit %d, want 1; stderr:\n%s", code, stderr)
		}
		if want := strings.Join(outputs, "\n"); normalize(stdout, ports) != want {
			t.Errorf("all upstreams:\n%s\nwant each report in configuration order:\n%s", stdout, want)
		}
	})

	t.Run("json", func(t *testing.T) {
		stdout, _, code := runCheck(t, append(flags, "-json")...)
		if code != 1 {
			t.Errorf("exit %d, want 1", code)
		}
		var reports []upstream.CheckReport
		if err := json.Unmarshal([]byte(stdout), &reports); err != nil {
			t.Fatalf("%v:\n%s", err, stdout)
		}
		want := map[string]upstream.Verdict{"good": upstream.VerdictOK, "wrong-tls": upstream.VerdictFail,
			"bad-password": upstream.VerdictFail, "bad-sender": upstream.VerdictFail}
		if len(reports) != len(want) {
			t.Fatalf("%d reports, want %d", len(reports), len(want))
		}
		for i, r := range reports {
			if r.Upstream != checkUpstreams[i] || r.Verdict != want[r.Upstream] {
				t.Errorf("report %d: %s %s", i, r.Upstream, r.Verdict)
			}
		}
		if strings.Contains(stdout, checkPassword) {
			t.Errorf("the JSON shows the password")
		}
	})
}

func TestCheckUpstreamUsageErrors(t *testing.T) {
	cfg, _ := checkConfig(t)
	bad := configtest.WriteFile(t, t.TempDir(), "bad.toml", "[[upstream]]\nname = \"x\"\n")
	tests := []struct {
		name   string
		args   []string
		stderr string
	}{
		{"unknown upstream", []string{"-config", cfg, "nope"}, `no upstream "nope"`},
		{"two names", []string{"-config", cfg, "good", "bad-sender"}, "usage: smarthost check-upstream"},
		{"bad sender", []string{"-config", cfg, "-from", "not-an-address", "good"}, "not an address"},
		{"bad config", []string{"-config", bad}, "upstream[0].address: required"},
		{"unknown flag", []string{"-config", cfg, "-bogus"}, "flag provided but not defined"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdout, stderr, code := runCheck(t, tt.args...)
			if code != 2 {
				t.Errorf("exit %d, want 2", code)
			}
			if !strings.Contains(stderr, tt.stderr) {
				t.Errorf("stderr %q, want it to contain %q", stderr, tt.stderr)
			}
			if stdout != "" {
				t.Errorf("stdout %q", stdout)
			}
		})
	}
	// The error lists what is configured.
	_, stderr, _ := runCheck(t, "-config", cfg, "nope")
	if !strings.Contains(stderr, "configured: good, wrong-tls, bad-password, bad-sender") {
		t.Errorf("stderr %q does not list the upstreams", stderr)
	}
}

func TestCheckUpstreamProviderHint(t *testing.T) {
	// A gmail profile with its address pointed at a loopback server that
	// refuses the password: the hint is Gmail's own.
	f := configtest.NewFiles(t)
	srv := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: f.PKI.ServerTLS(),
		Username: checkLogin, Password: "another-password"})
	text := f.Config(map[string]string{
		"upstream": fmt.Sprintf(`[[upstream]]
name = "gmail"
provider = "gmail"
address = %q
username = %q
password_file = "{{PWFILE}}"
ca_file = "{{CA}}"`, srv.Addr(), checkLogin),
		"route": `[[route]]
from_domain = "example.com"
upstreams = ["gmail"]`,
	})
	cfg := configtest.WriteFile(t, t.TempDir(), "config.toml", text)
	stdout, stderr, code := runCheck(t, "-config", cfg, "-timeout", "10s")
	if code != 1 || stderr != "" {
		t.Errorf("exit %d, want 1; stderr:\n%s", code, stderr)
	}
	if !strings.Contains(stdout, "fix       Gmail needs an app password (Google Account > Security") {
		t.Errorf("no Gmail hint:\n%s", stdout)
	}
}

// TestCheckWithoutOtherSecrets: check-upstream NAME needs only NAME's
// secret, and check-config -no-secrets none, where check-config needs all.
func TestCheckWithoutOtherSecrets(t *testing.T) {
	f := configtest.NewFiles(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: f.PKI.ServerTLS(),
		Username: checkLogin, Password: checkPassword})
	pw := configtest.WriteFile(t, t.TempDir(), "upstream-password", checkPassword+"\n")
	text := f.Config(map[string]string{
		"dkim": "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"{{MISSING}}\"",
		"upstream": fmt.Sprintf(`[[upstream]]
name = "good"
address = %q
tls = "implicit"
username = %q
password_file = %q
ca_file = %q

[[upstream]]
name = "other"
address = "127.0.0.1:2525"
tls = "none"
username = "u"
password_env = "SMARTHOST_TEST_UNSET_PW"`, up.Addr(), checkLogin, pw, f.PKI.CAFile),
		"route": "[[route]]\nfrom_domain = \"example.com\"\nupstreams = [\"good\", \"other\"]",
	})
	path := configtest.WriteFile(t, t.TempDir(), "config.toml", text)

	stdout, stderr, code := runCheck(t, "-config", path, "-timeout", "10s", "good")
	if code != 0 || !strings.Contains(stdout, "good") {
		t.Errorf("check-upstream good: exit %d\n%s%s", code, stdout, stderr)
	}
	stdout, stderr, code = runCheck(t, "-config", path, "other")
	if code != 2 || !strings.Contains(stderr, "upstream[1].password_env: environment variable SMARTHOST_TEST_UNSET_PW is not set or empty") ||
		strings.Contains(stderr, "dkim") {
		t.Errorf("check-upstream other: exit %d, want 2 naming only its own secret\n%s%s", code, stdout, stderr)
	}

	var out, errb bytes.Buffer
	code = run([]string{"check-config", "-config", path}, strings.NewReader(""), &out, &errb)
	if code != 1 || !strings.Contains(errb.String(), "2 problem(s)") || !strings.Contains(errb.String(), "dkim[0].key_file") {
		t.Errorf("check-config: exit %d, want 1 with the DKIM key and the password\n%s%s", code, out.String(), errb.String())
	}
	out.Reset()
	errb.Reset()
	code = run([]string{"check-config", "-no-secrets", "-config", path}, strings.NewReader(""), &out, &errb)
	if code != 0 || !strings.Contains(out.String(), ": OK (") || !strings.Contains(out.String(), "secrets not read") {
		t.Errorf("check-config -no-secrets: exit %d\n%s%s", code, out.String(), errb.String())
	}
}
