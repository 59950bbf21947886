package e2e

import (
	"bytes"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	msgauth "github.com/emersion/go-msgauth/dkim"

	"smarthost/dkim"
	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// python is Debian's interpreter, where python3-dkim (dkimpy) is installed.
const python = "/usr/bin/python3"

// TestDKIMEndToEnd submits messages through the relay and checks that what
// reaches the upstream carries signatures that both go-msgauth and dkimpy
// verify, and that one changed body byte breaks them.
func TestDKIMEndToEnd(t *testing.T) {
	t.Parallel()
	if out, err := exec.Command(python, "-I", "-c", "import dkim, nacl").CombinedOutput(); err != nil {
		t.Fatalf("dkimpy is needed (make test installs python3-dkim and python3-nacl): %v %s", err, out)
	}
	dir := t.TempDir()
	rsaKey, err := dkim.GenerateKey("rsa", 2048)
	if err != nil {
		t.Fatal(err)
	}
	edKey, err := dkim.GenerateKey("ed25519", 0)
	if err != nil {
		t.Fatal(err)
	}
	keyFile := func(name string, k crypto.Signer) string {
		pemData, err := dkim.MarshalKey(k)
		if err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pemData, 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	rsaFile, edFile := keyFile("rsa.key", rsaKey), keyFile("ed.key", edKey)
	entries := []struct {
		domain, selector, file string
		key                    crypto.Signer
	}{
		{"example.com", "rsa2026", rsaFile, rsaKey},
		{"example.com", "ed2026", edFile, edKey},
		{"rsa.example", "r1", rsaFile, rsaKey},
		{"ed.example", "e1", edFile, edKey},
	}
	var extra strings.Builder
	records := map[string]string{}
	for _, e := range entries {
		fmt.Fprintf(&extra, "\n[[dkim]]\ndomain = %q\nselector = %q\nkey_file = %q\n", e.domain, e.selector, e.file)
		v, err := dkim.RecordValue(e.key.Public())
		if err != nil {
			t.Fatal(err)
		}
		records[dkim.RecordName(e.domain, e.selector)] = v
	}
	recordsFile := filepath.Join(dir, "records.json")
	data, _ := json.Marshal(records)
	if err := os.WriteFile(recordsFile, data, 0o600); err != nil {
		t.Fatal(err)
	}

	pki := testpki.New(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	r := startRelay(t, writeConfig(t, relayConfig{
		Dir: dir, PKI: pki, UpstreamAddr: up.Addr(), MaxSize: "30MB", Extra: extra.String(),
		AllowedFrom: []string{"*@example.com", "*@rsa.example", "*@ed.example", "*@nokey.example"},
	}))

	// Lines of 1,500 octets are over RFC 5322's 998 but within what
	// upstreams accept; bare LFs are normalised before signing.
	tricky := "MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\n" +
		"bare LF line\nПривет, мир — Grüße — 日本語\n" + strings.Repeat("long ", 300) + "\n" +
		"trailing spaces   \n\n\r\n"
	big := "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--b\r\n" +
		"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n" +
		wrap76(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0, 1, 2, 0xfe, 0xff, 'x'}, 15<<20/6))) + "--b--\r\n"
	cases := []struct {
		name, from, rest string
		selectors        []string
		tamper           bool
	}{
		{"rsa", "app@rsa.example", "\r\nHello from RSA.\r\n", []string{"r1"}, true},
		{"ed25519", "app@ed.example", "\r\nHello from Ed25519.\r\n", []string{"e1"}, true},
		{"dual", "app@example.com", "\r\nHello twice.\r\n", []string{"rsa2026", "ed2026"}, true},
		{"tricky", "app@example.com", tricky, []string{"rsa2026", "ed2026"}, true},
		{"big", "app@rsa.example", big, []string{"r1"}, false},
		{"nokey", "app@nokey.example", "\r\nNo key for this domain.\r\n", nil, false},
	}
	c := dialRaw(t, r.addr, pki)
	for _, tc := range cases {
		c.expect(250, "MAIL FROM:<%s>", tc.from)
		c.expect(250, "RCPT TO:<bob@example.net>")
		c.expect(354, "DATA")
		c.write("From: " + tc.from + "\r\nTo: bob@example.net\r\nSubject: dkim " + tc.name + "\r\n" + tc.rest + ".\r\n")
		if code, msg := c.read(); code != 250 {
			t.Fatalf("%s: %d %s", tc.name, code, msg)
		}
	}
	msgs := up.WaitMessages(t, len(cases), 120*time.Second)
	bySubject := map[string][]byte{}
	for _, m := range msgs {
		if s := regexp.MustCompile(`(?m)^Subject: dkim (\w+)\r$`).FindSubmatch(m.Data); s != nil {
			bySubject[string(s[1])] = m.Data
		}
	}
	lookup := func(name string) ([]string, error) {
		if v, ok := records[name]; ok {
			return []string{v}, nil
		}
		return nil, fmt.Errorf("no record %s", name)
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			data := bySubject[tc.name]
			if data == nil {
				t.Fatal("not delivered")
			}
			sels := signatureSelectors(data)
			if strings.Join(sels, ",") != strings.Join(tc.selectors, ",") {
				t.Fatalf("selectors %v, want %v", sels, tc.selectors)
			}
			if len(tc.selectors) == 0 {
				return
			}
			vs, err := msgauth.VerifyWithOptions(bytes.NewReader(data), &msgauth.VerifyOptions{LookupTXT: lookup})
			if err != nil || len(vs) != len(tc.selectors) {
				t.Fatalf("go-msgauth: %v, %d results", err, len(vs))
			}
			for _, v := range vs {
				if v.Err != nil {
					t.Errorf("go-msgauth: d=%s: %v", v.Domain, v.Err)
				}
			}
			if out, err := dkimpy(t, recordsFile, data); err != nil || out != fmt.Sprintf("verified %d", len(tc.selectors)) {
				t.Fatalf("dkimpy: %v: %s", err, out)
			}
			if !tc.tamper {
				return
			}
			tampered := bytes.Clone(data)
			i := bytes.LastIndexFunc(tampered, func(r rune) bool { return r >= 'a' && r <= 'z' })
			tampered[i] -= 'a' - 'A'
			if out, err := dkimpy(t, recordsFile, tampered); err == nil {
				t.Fatalf("dkimpy verified a tampered message: %s", out)
			}
		})
	}
}

func dkimpy(t *testing.T, records string, msg []byte) (string, error) {
	t.Helper()
	f := filepath.Join(t.TempDir(), "msg.eml")
	if err := os.WriteFile(f, msg, 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(python, "testdata/dkimverify.py", records, f).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

func wrap76(s string) string {
	var b strings.Builder
	for len(s) > 76 {
		b.WriteString(s[:76])
		b.WriteString("\r\n")
		s = s[76:]
	}
	b.WriteString(s)
	b.WriteString("\r\n")
	return b.String()
}

// signatureSelectors returns the s= tag of each DKIM-Signature field of
// a message, top first.
func signatureSelectors(msg []byte) []string {
	header, _, _ := bytes.Cut(msg, []byte("\r\n\r\n"))
	unfolded := regexp.MustCompile(`\r\n[ \t]`).ReplaceAll(header, []byte(" "))
	var out []string
	for _, line := range strings.Split(string(unfolded), "\r\n") {
		if name, value, ok := strings.Cut(line, ":"); ok && strings.EqualFold(name, "DKIM-Signature") {
			if m := regexp.MustCompile(`(?:^|[;\s])s=([^;\s]+)`).FindStringSubmatch(value); m != nil {
				out = append(out, m[1])
			}
		}
	}
	return out
}
