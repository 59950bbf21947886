package config_test

import (
	"crypto"
	"reflect"
	"strings"
	"testing"

	"smarthost/cmd/smarthost/internal/config/configtest"
	"smarthost/dkim"
)

func loadKey(t *testing.T, path string) crypto.Signer {
	t.Helper()
	k, err := dkim.LoadKey(path)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// requireKeys compares keys field by field, the private keys with Equal.
func requireKeys(t *testing.T, got, want []dkim.Key) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("got %d DKIM keys, want %d: %+v", len(got), len(want), got)
	}
	for i := range want {
		g, w := got[i], want[i]
		eq, ok := g.Signer.(interface{ Equal(crypto.PrivateKey) bool })
		if g.Signer == nil || !ok || !eq.Equal(w.Signer) {
			t.Errorf("dkim[%d].Signer is not the key of the file", i)
		}
		g.Signer, w.Signer = nil, nil
		if !reflect.DeepEqual(g, w) {
			t.Errorf("dkim[%d] = %+v\nwant    %+v", i, g, w)
		}
	}
}

// dkimEntry is a valid [[dkim]] table with extra lines appended.
func dkimEntry(extra string) string {
	return "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"\n" + extra
}

// TestParseConfigDKIMRules breaks one [[dkim]] rule per case and checks
// that the error names the exact key and, for key files, the problem.
func TestParseConfigDKIMRules(t *testing.T) {
	f := configtest.NewFiles(t)
	keyFile := func(path string) string {
		return "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"" + path + "\""
	}
	tests := []struct {
		name     string
		dkim     string
		key, msg string // msg may hold {{…}} placeholders
	}{
		{"domain missing", "[[dkim]]\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].domain", "required"},
		{"domain invalid", "[[dkim]]\ndomain = \"exa mple.com\"\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].domain", "not a domain name"},
		{"domain wildcard", "[[dkim]]\ndomain = \"*.example.com\"\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].domain", "not a domain name"},
		{"domain wrong type", "[[dkim]]\ndomain = 1\nselector = \"s1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].domain", "must be a string"},
		{"selector missing", "[[dkim]]\ndomain = \"example.com\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].selector", "required"},
		{"selector underscore", "[[dkim]]\ndomain = \"example.com\"\nselector = \"s_1\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].selector", "not a valid DNS label"},
		{"selector empty label", "[[dkim]]\ndomain = \"example.com\"\nselector = \"a..b\"\nkey_file = \"{{DKIMRSA}}\"", "dkim[0].selector", "not a valid DNS label"},
		{"domain and selector duplicate", dkimEntry("") + "[[dkim]]\ndomain = \"EXAMPLE.com\"\nselector = \"S1\"\nkey_file = \"{{DKIM}}\"", "dkim[1].selector", "already used by dkim[0]"},

		{"key_file missing", "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"", "dkim[0].key_file", "required"},
		{"key_file empty path", keyFile(""), "dkim[0].key_file", "must not be empty"},
		{"key_file does not exist", keyFile("{{MISSING}}"), "dkim[0].key_file", "{{MISSING}}: no such file"},
		{"key_file unreadable", keyFile("{{DIR}}"), "dkim[0].key_file", "is a directory"},
		{"key_file empty", keyFile("{{EMPTY}}"), "dkim[0].key_file", "{{EMPTY}}: no PEM block"},
		{"key_file not PEM", keyFile("{{PWFILE}}"), "dkim[0].key_file", "{{PWFILE}}: no PEM block"},
		{"key_file a certificate", keyFile("{{CERT}}"), "dkim[0].key_file", `"CERTIFICATE" is not a private key`},
		{"key_file ECDSA", keyFile("{{DKIMECDSA}}"), "dkim[0].key_file", "{{DKIMECDSA}}: unsupported key type *ecdsa.PublicKey"},
		{"key_file RSA under 1024 bits", keyFile("{{DKIMSMALL}}"), "dkim[0].key_file", "{{DKIMSMALL}}: RSA key has 768 bits, at least 1024"},

		{"headers without From", dkimEntry(`headers = ["To", "Subject"]`), "dkim[0].headers", "must include From"},
		{"headers empty", dkimEntry(`headers = []`), "dkim[0].headers", "must include From"},
		{"headers bad name", dkimEntry(`headers = ["From", "X Bad"]`), "dkim[0].headers[1]", `"X Bad" is not a header field name`},
		{"headers colon", dkimEntry(`headers = ["From:"]`), "dkim[0].headers[0]", "not a header field name"},
		{"headers not an array", dkimEntry(`headers = "From"`), "dkim[0].headers", "must be an array of strings"},
		{"headers element type", dkimEntry(`headers = ["From", 3]`), "dkim[0].headers[1]", "must be a string"},
		{"canonicalization unknown", dkimEntry(`canonicalization = "relaxed/strict"`), "dkim[0].canonicalization", `"relaxed/strict": want`},
		{"canonicalization empty", dkimEntry(`canonicalization = ""`), "dkim[0].canonicalization", "want"},
		{"canonicalization half", dkimEntry(`canonicalization = "relaxed/"`), "dkim[0].canonicalization", "want"},
		{"canonicalization upper case", dkimEntry(`canonicalization = "Relaxed"`), "dkim[0].canonicalization", "want"},
		{"expiration zero", dkimEntry(`expiration = "0s"`), "dkim[0].expiration", "must be positive"},
		{"expiration negative", dkimEntry(`expiration = "-1h"`), "dkim[0].expiration", "must be positive"},
		{"expiration junk", dkimEntry(`expiration = "a week"`), "dkim[0].expiration", "not a duration"},
		{"expiration within max_age", dkimEntry(`expiration = "24h"`), "dkim[0].expiration", "must be longer than queue.max_age (120h0m0s)"},
		{"subdomains wrong type", dkimEntry(`subdomains = "yes"`), "dkim[0].subdomains", "true or false"},
		{"unknown key", dkimEntry(`algorithm = "rsa"`), "dkim[0].algorithm", "unknown key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			text := strings.ReplaceAll(f.Config(map[string]string{"dkim": tt.dkim}), "{{DIR}}", t.TempDir())
			errs := parseErrors(t, text)
			requireError(t, errs, tt.key, f.Expand(tt.msg))
		})
	}
}

// TestParseConfigDKIMAccepted covers the [[dkim]] forms that must load:
// both key encodings and types, every canonicalization, and several keys
// for one domain.
func TestParseConfigDKIMAccepted(t *testing.T) {
	f := configtest.NewFiles(t)
	for _, tt := range []struct {
		value        string
		header, body string
	}{
		{"relaxed/relaxed", "relaxed", "relaxed"},
		{"relaxed/simple", "relaxed", "simple"},
		{"simple/relaxed", "simple", "relaxed"},
		{"simple/simple", "simple", "simple"},
		// One name is the header algorithm; the body is simple (RFC 6376
		// section 3.5, c= tag).
		{"relaxed", "relaxed", "simple"},
		{"simple", "simple", "simple"},
	} {
		t.Run("canonicalization "+tt.value, func(t *testing.T) {
			cfg := configtest.MustParse(t, f.Config(map[string]string{"dkim": dkimEntry(`canonicalization = "` + tt.value + `"`)}))
			if k := cfg.DKIM[0]; k.HeaderCanonicalization != tt.header || k.BodyCanonicalization != tt.body {
				t.Errorf("%q gave %s/%s, want %s/%s", tt.value, k.HeaderCanonicalization, k.BodyCanonicalization, tt.header, tt.body)
			}
		})
	}

	t.Run("defaults", func(t *testing.T) {
		cfg := configtest.MustParse(t, f.Config(map[string]string{"dkim": dkimEntry("")}))
		want := []dkim.Key{{Domain: "example.com", Selector: "s1", Signer: loadKey(t, f.DKIMRSA),
			HeaderCanonicalization: "relaxed", BodyCanonicalization: "relaxed"}}
		requireKeys(t, cfg.DKIM, want)
	})

	// RSA beside Ed25519, and an old and a new selector during a
	// rotation: four keys, one domain.
	t.Run("several keys for one domain", func(t *testing.T) {
		var entries strings.Builder
		for _, e := range []struct{ sel, file string }{
			{"rsa2025", "{{DKIMPKCS1}}"}, {"ed2025", "{{DKIM}}"}, {"rsa2026", "{{DKIMRSA}}"}, {"ed2026", "{{DKIM}}"},
		} {
			entries.WriteString("[[dkim]]\ndomain = \"example.com\"\nselector = \"" + e.sel + "\"\nkey_file = \"" + e.file + "\"\n")
		}
		cfg := configtest.MustParse(t, f.Config(map[string]string{"dkim": entries.String()}))
		if len(cfg.DKIM) != 4 {
			t.Fatalf("got %d keys, want 4", len(cfg.DKIM))
		}
		// The set must build a signer that signs with all four.
		s, err := dkim.New(cfg.DKIM, nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := len(s.KeysFor("example.com")); got != 4 {
			t.Errorf("signer has %d keys for example.com, want 4", got)
		}
	})

	t.Run("same selector in two domains", func(t *testing.T) {
		text := f.Config(map[string]string{"dkim": dkimEntry("") +
			"[[dkim]]\ndomain = \"example.org\"\nselector = \"s1\"\nkey_file = \"{{DKIM}}\""})
		if cfg := configtest.MustParse(t, text); len(cfg.DKIM) != 2 {
			t.Errorf("got %d keys, want 2", len(cfg.DKIM))
		}
	})
}
