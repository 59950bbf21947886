// Package configtest writes the files that test configurations point at
// and builds small valid configurations from them, for the tests of the
// configuration and of the commands that read one.
package configtest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	_ "embed"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/dkim"
	"smarthost/internal/testpki"
)

// rsa768 is an RSA key under the minimum DKIM size. Go refuses to
// generate RSA keys under 1024 bits; this one was made with
// openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:768.
//
//go:embed testdata/rsa-768.key
var rsa768 []byte

// Files are real files that configurations under test point at.
type Files struct {
	PKI          *testpki.PKI
	OtherKey     string // a key that does not match PKI.CertFile
	DKIMKey      string // Ed25519, PKCS#8
	DKIMRSA      string // RSA-1024, PKCS#8
	DKIMPKCS1    string // the same RSA key, PKCS#1
	DKIMECDSA    string // a P-256 key: a type DKIM does not sign with
	DKIMSmall    string // RSA-768, under the minimum
	PasswordFile string // "s3cret\n"
	EmptyFile    string
	Missing      string // a path that does not exist
	Hash         string // bcrypt of "pw", minimum cost for speed
}

// NewFiles writes the files into a directory of t's.
func NewFiles(t testing.TB) *Files {
	t.Helper()
	dir := t.TempDir()
	f := &Files{PKI: testpki.New(t), Missing: filepath.Join(dir, "missing")}
	_, _, f.OtherKey = f.PKI.Issue(t, "other", "other.test")

	ed, err := dkim.GenerateKey("ed25519", 0)
	if err != nil {
		t.Fatal(err)
	}
	f.DKIMKey = writeKey(t, dir, "dkim-ed25519.key", ed)
	// 1024 bits, the minimum, keeps key generation fast under -race.
	rsaKey, err := dkim.GenerateKey("rsa", 1024)
	if err != nil {
		t.Fatal(err)
	}
	f.DKIMRSA = writeKey(t, dir, "dkim-rsa.key", rsaKey)
	f.DKIMPKCS1 = WriteFile(t, dir, "dkim-rsa-pkcs1.key", string(pem.EncodeToMemory(&pem.Block{
		Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey.(*rsa.PrivateKey)),
	})))
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	f.DKIMECDSA = writeKey(t, dir, "dkim-ecdsa.key", ec)
	f.DKIMSmall = WriteFile(t, dir, "dkim-rsa-768.key", string(rsa768))
	f.PasswordFile = WriteFile(t, dir, "password", "s3cret\n")
	f.EmptyFile = WriteFile(t, dir, "empty", "")
	h, err := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	f.Hash = string(h)
	return f
}

// writeKey writes k as PKCS#8 PEM.
func writeKey(t testing.TB, dir, name string, k crypto.Signer) string {
	t.Helper()
	data, err := dkim.MarshalKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return WriteFile(t, dir, name, string(data))
}

// WriteFile writes data to the file name in dir and returns its path.
func WriteFile(t testing.TB, dir, name, data string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Expand fills the {{…}} placeholders of a test configuration.
func (f *Files) Expand(s string) string {
	return strings.NewReplacer(
		"{{CERT}}", f.PKI.CertFile,
		"{{KEY}}", f.PKI.KeyFile,
		"{{OTHERKEY}}", f.OtherKey,
		"{{CA}}", f.PKI.CAFile,
		"{{DKIM}}", f.DKIMKey,
		"{{DKIMRSA}}", f.DKIMRSA,
		"{{DKIMPKCS1}}", f.DKIMPKCS1,
		"{{DKIMECDSA}}", f.DKIMECDSA,
		"{{DKIMSMALL}}", f.DKIMSmall,
		"{{PWFILE}}", f.PasswordFile,
		"{{EMPTY}}", f.EmptyFile,
		"{{MISSING}}", f.Missing,
		"{{HASH}}", f.Hash,
	).Replace(s)
}

// Base is one section of a small valid configuration, with {{…}}
// placeholders: "top" (the top-level keys), "tls", "listen", "user",
// "upstream" or "route"; "" for the sections it leaves out ("queue",
// "limits", "dkim", "http").
func Base(section string) string {
	switch section {
	case "top":
		return `hostname = "relay.test"`
	case "tls":
		return "[tls]\ncert_file = \"{{CERT}}\"\nkey_file = \"{{KEY}}\""
	case "listen":
		return "[[listen]]\naddress = \"127.0.0.1:0\"\ntls = \"starttls\"\nauth = \"required\""
	case "user":
		return "[[user]]\nname = \"app\"\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"app@example.com\"]"
	case "upstream":
		return "[[upstream]]\nname = \"up\"\naddress = \"127.0.0.1:2525\"\ntls = \"none\""
	case "route":
		return "[[route]]\nfrom_domain = \"example.com\"\nupstreams = [\"up\"]"
	}
	return ""
}

// Config is the small valid configuration with the sections in
// overrides replaced, its placeholders expanded, so that each test case
// writes only the part it breaks.
func (f *Files) Config(overrides map[string]string) string {
	var b strings.Builder
	for _, s := range []string{"top", "queue", "tls", "listen", "limits", "user", "dkim", "upstream", "route", "http"} {
		text, ok := overrides[s]
		if !ok {
			text = Base(s)
		}
		b.WriteString(text)
		b.WriteString("\n\n")
	}
	return f.Expand(b.String())
}

// MustParse parses text, failing t unless it is valid.
func MustParse(t testing.TB, text string) *config.Config {
	t.Helper()
	cfg, err := config.Parse([]byte(text), "test.toml")
	if err != nil {
		t.Fatalf("Parse: %v\n%s", err, text)
	}
	return cfg
}
