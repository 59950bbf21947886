package main

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"smarthost/cmd/smarthost/internal/config/configtest"
	"smarthost/dkim"
)

// runCmd runs the binary's entry point in process.
func runCmd(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = run(args, strings.NewReader(""), &out, &errOut)
	return code, out.String(), errOut.String()
}

// keygen runs `dkim keygen` and returns the zone line it printed.
func keygen(t *testing.T, domain, selector, algo, out string, extra ...string) string {
	t.Helper()
	args := append([]string{"dkim", "keygen", "-domain", domain, "-selector", selector, "-algo", algo, "-out", out}, extra...)
	code, stdout, stderr := runCmd(t, args...)
	if code != 0 {
		t.Fatalf("keygen exit %d\nstdout:\n%s\nstderr:\n%s", code, stdout, stderr)
	}
	var zone string
	for line := range strings.SplitSeq(stdout, "\n") {
		if strings.HasPrefix(line, ";") || line == "" {
			continue // zone-file comments: the hints
		}
		if zone != "" {
			t.Fatalf("more than one record line in:\n%s", stdout)
		}
		zone = line
	}
	if zone == "" {
		t.Fatalf("no record line in:\n%s", stdout)
	}
	return zone
}

var quoted = regexp.MustCompile(`"([^"]*)"`)

// zoneStrings returns the character strings of a zone-file TXT line.
func zoneStrings(t *testing.T, zone string) []string {
	t.Helper()
	var out []string
	for _, m := range quoted.FindAllStringSubmatch(zone, -1) {
		out = append(out, m[1])
	}
	if len(out) == 0 {
		t.Fatalf("no strings in %q", zone)
	}
	return out
}

// recordTags parses a DKIM key record (RFC 6376 section 3.6.1).
func recordTags(t *testing.T, record string) map[string]string {
	t.Helper()
	tags := map[string]string{}
	for part := range strings.SplitSeq(record, ";") {
		name, value, ok := strings.Cut(strings.TrimSpace(part), "=")
		if !ok {
			if strings.TrimSpace(part) != "" {
				t.Fatalf("bad tag %q in %q", part, record)
			}
			continue
		}
		tags[strings.TrimSpace(name)] = strings.TrimSpace(value)
	}
	return tags
}

func TestDKIMKeygen(t *testing.T) {
	for _, tt := range []struct {
		algo    string
		strings int // character strings in the TXT record
	}{
		{"rsa", 2}, // 2048 bits: the record is longer than one 255-byte string
		{"ed25519", 1},
	} {
		t.Run(tt.algo, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "example.com.key")
			zone := keygen(t, "Example.COM", "s2026", tt.algo, file)

			st, err := os.Stat(file)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode() != 0o600 {
				t.Errorf("key file mode = %v, want -rw-------", st.Mode())
			}
			key, err := dkim.LoadKey(file)
			if err != nil {
				t.Fatalf("written key does not load: %v", err)
			}

			if want := "s2026._domainkey.example.com. IN TXT "; !strings.HasPrefix(zone, want) {
				t.Errorf("zone line %q does not start with %q", zone, want)
			}
			parts := zoneStrings(t, zone)
			if len(parts) != tt.strings {
				t.Errorf("record has %d strings, want %d: %s", len(parts), tt.strings, zone)
			}
			for i, p := range parts {
				if len(p) > 255 {
					t.Errorf("string %d is %d bytes, over 255", i, len(p))
				}
			}
			tags := recordTags(t, strings.Join(parts, ""))
			if tags["v"] != "DKIM1" || tags["k"] != tt.algo {
				t.Errorf("tags v=%q k=%q, want DKIM1 and %s", tags["v"], tags["k"], tt.algo)
			}
			p, err := base64.StdEncoding.DecodeString(tags["p"])
			if err != nil {
				t.Fatalf("p= is not base64: %v", err)
			}
			var published crypto.PublicKey
			if tt.algo == "rsa" {
				if published, err = x509.ParsePKIXPublicKey(p); err != nil {
					t.Fatalf("p= is not a SubjectPublicKeyInfo: %v", err)
				}
			} else {
				// RFC 8463 section 4.2: the raw 32-byte key.
				if len(p) != ed25519.PublicKeySize {
					t.Fatalf("p= is %d bytes, want %d", len(p), ed25519.PublicKeySize)
				}
				published = ed25519.PublicKey(p)
			}
			if !key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(published) {
				t.Error("p= is not the public half of the written key")
			}

			// The record that keygen printed passes check, given as its
			// joined value or as the zone line itself.
			name := "s2026._domainkey.example.com"
			for _, record := range []string{strings.Join(parts, ""), zone} {
				code, stdout, stderr := runCmd(t, "dkim", "check", "-domain", "example.com", "-selector", "s2026", "-key", file, "-record", record)
				if want := "OK: " + name + " matches " + file + "\n"; code != 0 || stdout != want {
					t.Errorf("check = %d %q (stderr %q), want 0 %q", code, stdout, stderr, want)
				}
			}
		})
	}
}

func TestDKIMKeygenHints(t *testing.T) {
	file := filepath.Join(t.TempDir(), "k.pem")
	code, stdout, _ := runCmd(t, "dkim", "keygen", "-domain", "example.org", "-selector", "ed", "-algo", "ed25519", "-out", file)
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	want := `; config: [[dkim]] domain = "example.org"  selector = "ed"  key_file = "` + file + `"`
	if !strings.Contains(stdout, want+"\n") {
		t.Errorf("output lacks the config hint %q:\n%s", want, stdout)
	}
}

func TestDKIMKeygenOverwrite(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "dkim.key")
	keygen(t, "example.com", "s1", "ed25519", file)
	first, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}

	code, stdout, stderr := runCmd(t, "dkim", "keygen", "-domain", "example.com", "-selector", "s1", "-algo", "ed25519", "-out", file)
	if code != 1 || !strings.Contains(stderr, "exists; use -force") || stdout != "" {
		t.Errorf("keygen over an existing key = %d, stdout %q, stderr %q; want 1 and a -force hint", code, stdout, stderr)
	}
	if again, _ := os.ReadFile(file); !bytes.Equal(again, first) {
		t.Fatal("the existing key was changed without -force")
	}

	keygen(t, "example.com", "s1", "ed25519", file, "-force")
	second, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(second, first) {
		t.Error("-force kept the old key")
	}
	if _, err := dkim.ParseKey(second); err != nil {
		t.Errorf("replaced key does not load: %v", err)
	}
	if st, _ := os.Stat(file); st.Mode() != 0o600 {
		t.Errorf("replaced key mode = %v, want -rw-------", st.Mode())
	}
	// The temporary file was renamed, not left behind.
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("dir holds %d entries, want only the key", len(entries))
	}
}

// TestWriteKeyFileExclusive covers the exclusive create itself, which
// keygen's early existence check normally pre-empts.
func TestWriteKeyFileExclusive(t *testing.T) {
	file := configtest.WriteFile(t, t.TempDir(), "key", "old")
	if err := writeKeyFile(file, []byte("new"), false); err == nil || !strings.Contains(err.Error(), "exists") {
		t.Errorf("writeKeyFile over a file = %v, want an exists error", err)
	}
	if data, _ := os.ReadFile(file); string(data) != "old" {
		t.Errorf("file = %q, want it untouched", data)
	}
	if err := writeKeyFile(file, []byte("new"), true); err != nil {
		t.Fatal(err)
	}
	if data, _ := os.ReadFile(file); string(data) != "new" {
		t.Errorf("file = %q after force", data)
	}
}

func TestDKIMCheckMismatch(t *testing.T) {
	dir := t.TempDir()
	fileA := filepath.Join(dir, "a.key")
	fileB := filepath.Join(dir, "b.key")
	keygen(t, "example.com", "s1", "ed25519", fileA)
	zoneB := keygen(t, "example.com", "s1", "ed25519", fileB)
	rsaFile := filepath.Join(dir, "rsa.key")
	zoneRSA := keygen(t, "example.com", "s1", "rsa", rsaFile, "-bits", "1024")

	for _, tt := range []struct{ name, key, record string }{
		{"another key's record", fileA, strings.Join(zoneStrings(t, zoneB), "")},
		{"another algorithm's record", fileA, strings.Join(zoneStrings(t, zoneRSA), "")},
		{"revoked", rsaFile, "v=DKIM1; k=rsa; p="},
		{"not a key record", fileA, "v=spf1 -all"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, _ := runCmd(t, "dkim", "check", "-domain", "example.com", "-selector", "s1", "-key", tt.key, "-record", tt.record)
			if want := "MISMATCH: s1._domainkey.example.com does not match " + tt.key + ": "; code != 1 || !strings.HasPrefix(stdout, want) {
				t.Errorf("check = %d %q, want 1 and %q…", code, stdout, want)
			}
		})
	}

	code, stdout, _ := runCmd(t, "dkim", "check", "-domain", "example.com", "-selector", "s1", "-key", filepath.Join(dir, "missing.key"), "-record", "v=DKIM1; p=x")
	if code != 1 || !strings.HasPrefix(stdout, "ERROR: ") || !strings.Contains(stdout, "missing.key") {
		t.Errorf("check with a missing key = %d %q, want 1 and ERROR naming the file", code, stdout)
	}
}

// TestDKIMCheckLookup drives the DNS path with a fake resolver: the name
// looked up, and how zero, one or several records are reported.
func TestDKIMCheckLookup(t *testing.T) {
	file := filepath.Join(t.TempDir(), "k.key")
	zone := keygen(t, "example.com", "s1", "ed25519", file)
	record := strings.Join(zoneStrings(t, zone), "")
	const name = "s1._domainkey.example.com"

	for _, tt := range []struct {
		name    string
		records []string
		err     error
		code    int
		prefix  string
	}{
		{"published", []string{record}, nil, 0, "OK: " + name + " matches "},
		{"other record", []string{"v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(make([]byte, 32))}, nil, 1, "MISMATCH: "},
		{"none", nil, nil, 1, "ERROR: no TXT record at " + name},
		{"several", []string{record, record}, nil, 1, "ERROR: 2 TXT records at " + name},
		{"lookup fails", nil, errors.New("no such host"), 1, "ERROR: look up TXT " + name + ": no such host"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var asked []string
			lookup := func(q string) ([]string, error) {
				asked = append(asked, q)
				return tt.records, tt.err
			}
			var out, errOut bytes.Buffer
			code := runDKIMCheck([]string{"-domain", "Example.com", "-selector", "s1", "-key", file}, &out, &errOut, lookup)
			if code != tt.code || !strings.HasPrefix(out.String(), tt.prefix) {
				t.Errorf("check = %d %q, want %d and %q…", code, out.String(), tt.code, tt.prefix)
			}
			if len(asked) != 1 || asked[0] != name {
				t.Errorf("looked up %q, want [%s]", asked, name)
			}
		})
	}
}

func TestDKIMUsageErrors(t *testing.T) {
	out := filepath.Join(t.TempDir(), "k.key")
	for _, tt := range []struct {
		name string
		args []string
		msg  string
	}{
		{"no subcommand", []string{"dkim"}, "Usage:"},
		{"unknown subcommand", []string{"dkim", "rotate"}, `unknown command "rotate"`},
		{"keygen no domain", []string{"dkim", "keygen", "-selector", "s", "-out", out}, "-domain is required"},
		{"keygen no selector", []string{"dkim", "keygen", "-domain", "example.com", "-out", out}, "-selector is required"},
		{"keygen no out", []string{"dkim", "keygen", "-domain", "example.com", "-selector", "s"}, "-out is required"},
		{"keygen bad domain", []string{"dkim", "keygen", "-domain", "exa mple.com", "-selector", "s", "-out", out}, "not a domain name"},
		{"keygen bad selector", []string{"dkim", "keygen", "-domain", "example.com", "-selector", "s_1", "-out", out}, "not a valid DNS label"},
		{"keygen bad algo", []string{"dkim", "keygen", "-domain", "example.com", "-selector", "s", "-algo", "dsa", "-out", out}, `-algo "dsa": want rsa or ed25519`},
		{"keygen bits too few", []string{"dkim", "keygen", "-domain", "example.com", "-selector", "s", "-bits", "768", "-out", out}, "-bits 768"},
		{"keygen bits too many", []string{"dkim", "keygen", "-domain", "example.com", "-selector", "s", "-bits", "16384", "-out", out}, "-bits 16384"},
		{"keygen bits for ed25519", []string{"dkim", "keygen", "-domain", "example.com", "-selector", "s", "-algo", "ed25519", "-bits", "2048", "-out", out}, "-bits applies to -algo rsa only"},
		{"keygen extra argument", []string{"dkim", "keygen", "-domain", "example.com", "-selector", "s", "-out", out, "now"}, `unexpected argument "now"`},
		{"keygen unknown flag", []string{"dkim", "keygen", "-size", "2048"}, "flag provided but not defined"},
		{"check no key", []string{"dkim", "check", "-domain", "example.com", "-selector", "s"}, "-key is required"},
		{"check no domain", []string{"dkim", "check", "-selector", "s", "-key", out}, "-domain is required"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCmd(t, tt.args...)
			if code != 2 || !strings.Contains(stderr, tt.msg) {
				t.Errorf("exit %d, stderr %q; want 2 and %q", code, stderr, tt.msg)
			}
			if stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
		})
	}
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a usage error wrote %s", out)
	}
}
