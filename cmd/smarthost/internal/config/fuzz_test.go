package config_test

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/dkim"
	"smarthost/internal/mailproto"
	"smarthost/internal/testpki"
	"smarthost/relay/upstream"
)

// fuzzConfigFiles writes the files the seed configurations name, under
// the relative paths they use, into a fresh directory, so that a seed can
// parse all the way through when run from there.
func fuzzConfigFiles(f *testing.F) string {
	dir := f.TempDir()
	pki := testpki.New(f)
	write := func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			f.Fatal(err)
		}
	}
	copyFile := func(name, from string) {
		data, err := os.ReadFile(from)
		if err != nil {
			f.Fatal(err)
		}
		write(name, data)
	}
	copyFile("tls.crt", pki.CertFile)
	copyFile("tls.key", pki.KeyFile)
	copyFile("ca.pem", pki.CAFile)
	for name, spec := range map[string]struct {
		algo string
		bits int
	}{"dkim-rsa.key": {"rsa", 1024}, "dkim-ed25519.key": {"ed25519", 0}} {
		k, err := dkim.GenerateKey(spec.algo, spec.bits)
		if err != nil {
			f.Fatal(err)
		}
		data, err := dkim.MarshalKey(k)
		if err != nil {
			f.Fatal(err)
		}
		write(name, data)
	}
	write("password", []byte("s3cret\n"))
	f.Setenv("GMAIL_APP_PASSWORD", "app-password")
	f.Setenv("SMARTHOST_ADMIN_TOKEN", "admin-token")
	return dir
}

// hostileFile reports whether a configuration might name a file that
// blocks or never ends when read (/dev/zero, /proc/self/fd/0):
// reading those is the operator's choice and no parser bug, but it would
// hang the fuzzer. TOML escapes could spell such a name, so inputs with
// them are left out too.
func hostileFile(data []byte) bool {
	for _, s := range []string{"/dev", "/proc", "/sys", `\u`, `\U`} {
		if bytes.Contains(data, []byte(s)) {
			return true
		}
	}
	return false
}

func FuzzParseConfig(f *testing.F) {
	dir := fuzzConfigFiles(f)
	f.Fuzz(func(t *testing.T, data []byte) {
		if hostileFile(data) {
			t.Skip("may name a device or proc file")
		}
		// Here, not before f.Fuzz: the seed corpus is read from the
		// package directory.
		t.Chdir(dir)
		cfg, err := config.Parse(data, "fuzz.toml")
		if err != nil {
			if _, ok := err.(config.Errors); !ok {
				t.Fatalf("error %T is not config.Errors: %v", err, err)
			}
			if cfg != nil {
				t.Fatalf("config %+v returned with error %v", cfg, err)
			}
			return
		}
		checkConfigInvariants(t, cfg)
	})
}

// checkConfigInvariants holds what every accepted configuration promises
// the rest of the binary.
func checkConfigInvariants(t *testing.T, cfg *config.Config) {
	t.Helper()
	if len(cfg.Listeners) == 0 || len(cfg.Upstreams) == 0 || len(cfg.Routes) == 0 {
		t.Fatalf("accepted without listeners, upstreams or routes: %+v", cfg)
	}
	needCert := false
	for i, l := range cfg.Listeners {
		switch l.TLS {
		case mailproto.TLSStartTLS, mailproto.TLSImplicit:
			needCert = true
		case mailproto.TLSNone:
		default:
			t.Errorf("listen[%d]: TLS mode %q", i, l.TLS)
		}
		// Never an open relay, never a password in plain text from anywhere.
		if !l.AuthRequired && len(l.TrustedNetworks) == 0 {
			t.Errorf("listen[%d]: no AUTH and no trusted_networks: open relay", i)
		}
		if l.TLS == mailproto.TLSNone && l.AuthRequired && len(l.TrustedNetworks) == 0 {
			t.Errorf("listen[%d]: plain-text AUTH from any network", i)
		}
		for _, p := range append(append([]netip.Prefix(nil), l.TrustedNetworks...), l.ProxyTrusted...) {
			if !p.IsValid() || p.Bits() == 0 {
				t.Errorf("listen[%d]: trusts %v: every address", i, p)
			}
		}
		if l.ProxyProtocol && len(l.ProxyTrusted) == 0 {
			t.Errorf("listen[%d]: proxy_protocol without proxy_trusted", i)
		}
	}
	if needCert && (cfg.TLSCertFile == "" || cfg.TLSKeyFile == "") {
		t.Errorf("a TLS listener without [tls] cert_file and key_file")
	}
	for i, u := range cfg.Users {
		if _, err := bcrypt.Cost(u.PasswordHash); err != nil {
			t.Errorf("user[%d]: password hash %q: %v", i, u.PasswordHash, err)
		}
		if len(u.AllowedFrom) == 0 {
			t.Errorf("user[%d]: no allowed_from", i)
		}
		for _, p := range u.AllowedFrom {
			if p != "*" && mailproto.DomainOf(p) == "" {
				t.Errorf("user[%d]: allowed_from %q has no domain", i, p)
			}
		}
	}
	names := map[string]bool{}
	for i, u := range cfg.Upstreams {
		if names[u.Name] {
			t.Errorf("upstream[%d]: name %q twice", i, u.Name)
		}
		names[u.Name] = true
		switch u.TLS {
		case mailproto.TLSImplicit, mailproto.TLSStartTLS:
		case mailproto.TLSNone:
			if !config.IsLoopbackHost(u.Address) {
				t.Errorf("upstream[%d]: plain text to %s, not loopback", i, u.Address)
			}
		default:
			t.Errorf("upstream[%d]: TLS mode %q", i, u.TLS)
		}
		if u.Username != "" && u.Password == "" {
			t.Errorf("upstream[%d]: username without password", i)
		}
		if u.RateLimit != (upstream.Rate{}) && (u.RateLimit.N <= 0 || u.RateLimit.Per <= 0) {
			t.Errorf("upstream[%d]: rate %+v", i, u.RateLimit)
		}
	}
	for i, r := range cfg.Routes {
		if len(r.Upstreams) == 0 {
			t.Errorf("route[%d]: no upstreams", i)
		}
		for _, n := range r.Upstreams {
			if !names[n] {
				t.Errorf("route[%d]: unknown upstream %q", i, n)
			}
		}
	}
	if cfg.Queue.Path == "" || cfg.Queue.Workers < 1 {
		t.Errorf("queue %+v", cfg.Queue)
	}
	if cfg.Limits.MaxRecipients < 1 || cfg.Limits.MaxConnections < 1 || cfg.Limits.AuthFailuresPerIP < 1 ||
		cfg.Limits.MaxMessageBytes < 0 {
		t.Errorf("limits %+v", cfg.Limits)
	}
	for i, k := range cfg.DKIM {
		if k.Signer == nil {
			t.Errorf("dkim[%d]: no key", i)
		} else if err := dkim.CheckKey(k.Signer); err != nil {
			t.Errorf("dkim[%d]: %v", i, err)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		n, err := config.ParseSize(s)
		if err != nil {
			if n != 0 {
				t.Errorf("ParseSize(%q) = %d with error %v", s, n, err)
			}
			return
		}
		if n < 0 {
			t.Fatalf("ParseSize(%q) = %d, negative", s, n)
		}
		// The same number of bytes written out parses to itself, with
		// every unit that divides it.
		for unit, mult := range map[string]int64{"": 1, "B": 1, "KB": 1 << 10, "MiB": 1 << 20, "gb": 1 << 30} {
			if n%mult != 0 {
				continue
			}
			in := strconv.FormatInt(n/mult, 10) + unit
			if back, err := config.ParseSize(in); err != nil || back != n {
				t.Errorf("ParseSize(%q) = %d; ParseSize(%q) = %d, %v", s, n, in, back, err)
			}
		}
	})
}

func FuzzParseRate(f *testing.F) {
	f.Fuzz(func(t *testing.T, s string) {
		r, err := config.ParseRate(s)
		if err != nil {
			if r != (upstream.Rate{}) {
				t.Errorf("ParseRate(%q) = %+v with error %v", s, r, err)
			}
			return
		}
		if r.N <= 0 || r.Per <= 0 {
			t.Fatalf("ParseRate(%q) = %+v, not positive", s, r)
		}
		in := fmt.Sprintf("%d/%s", r.N, r.Per)
		if back, err := config.ParseRate(in); err != nil || back != r {
			t.Errorf("ParseRate(%q) = %+v; ParseRate(%q) = %+v, %v", s, r, in, back, err)
		}
	})
}
