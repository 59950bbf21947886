package dkim

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	msgauth "github.com/emersion/go-msgauth/dkim"
)

// Keys are expensive to make; tests share these.
var (
	keysOnce sync.Once
	rsaKey   *rsa.PrivateKey
	rsaKey2  *rsa.PrivateKey
	edKey    ed25519.PrivateKey
)

func testKeys(t testing.TB) {
	t.Helper()
	keysOnce.Do(func() {
		var err error
		if rsaKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
		if rsaKey2, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
		if _, edKey, err = ed25519.GenerateKey(rand.Reader); err != nil {
			panic(err)
		}
	})
}

// resolver serves the TXT records of keys, like DNS would.
func resolver(t testing.TB, keys ...Key) func(string) ([]string, error) {
	t.Helper()
	records := map[string]string{}
	for _, k := range keys {
		v, err := RecordValue(k.Signer.Public())
		if err != nil {
			t.Fatal(err)
		}
		records[RecordName(k.Domain, k.Selector)] = v
	}
	return func(name string) ([]string, error) {
		if v, ok := records[name]; ok {
			return []string{v}, nil
		}
		return nil, fmt.Errorf("no TXT record for %s", name)
	}
}

// verify checks every signature of a signed message and returns d=/s=
// pairs of those that verify; it fails the test on any that does not.
func verify(t *testing.T, signed []byte, lookup func(string) ([]string, error)) []string {
	t.Helper()
	vs, err := msgauth.VerifyWithOptions(bytes.NewReader(signed), &msgauth.VerifyOptions{LookupTXT: lookup})
	if err != nil {
		t.Fatal(err)
	}
	var ok []string
	for _, v := range vs {
		if v.Err != nil {
			t.Errorf("signature d=%s does not verify: %v", v.Domain, v.Err)
			continue
		}
		ok = append(ok, v.Domain)
	}
	return ok
}

func mustNew(t testing.TB, keys ...Key) *Signer {
	t.Helper()
	s, err := New(keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func sign(t testing.TB, s *Signer, domain string, msg []byte) []byte {
	t.Helper()
	sig, err := s.Sign(domain, msg)
	if err != nil {
		t.Fatal(err)
	}
	return append(sig, msg...)
}

var tagS = regexp.MustCompile(`[;\s]s=([^;\s]+)`)

func selectors(signed []byte) []string {
	var out []string
	for _, m := range tagS.FindAllSubmatch(signed, -1) {
		out = append(out, string(m[1]))
	}
	return out
}

// TestGoldenMessages signs each message under testdata/messages with RSA
// and Ed25519 keys and verifies both signatures.
func TestGoldenMessages(t *testing.T) {
	testKeys(t)
	files, err := filepath.Glob("testdata/messages/*.eml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden messages: %v", err)
	}
	keys := []Key{
		{Domain: "example.com", Selector: "rsa", Signer: rsaKey},
		{Domain: "example.com", Selector: "ed", Signer: edKey},
	}
	s := mustNew(t, keys...)
	lookup := resolver(t, keys...)
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			msg, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			signed := sign(t, s, "example.com", msg)
			if !bytes.HasSuffix(signed, msg) {
				t.Fatal("message changed by signing")
			}
			if got := verify(t, signed, lookup); len(got) != 2 {
				t.Fatalf("%d signatures verified, want 2", len(got))
			}
			if sel := selectors(signed); strings.Join(sel, ",") != "rsa,ed" {
				t.Errorf("selectors %v", sel)
			}
			// One changed byte breaks both: the last letter, which is in the
			// body, or in the last field's value when there is no body.
			i := bytes.LastIndexFunc(signed, func(r rune) bool { return r >= 'a' && r <= 'z' })
			tampered := bytes.Clone(signed)
			tampered[i] -= 'a' - 'A'
			vs, err := msgauth.VerifyWithOptions(bytes.NewReader(tampered), &msgauth.VerifyOptions{LookupTXT: lookup})
			if err != nil {
				t.Fatal(err)
			}
			for _, v := range vs {
				if v.Err == nil {
					t.Errorf("tampered message verifies (d=%s)", v.Domain)
				}
			}
		})
	}
}

const msg1 = "From: Billing <billing@example.com>\r\nTo: bob@example.net\r\nSubject: hi\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <a@example.com>\r\n\r\nHello.\r\n"

func TestRotationSideBySide(t *testing.T) {
	testKeys(t)
	keys := []Key{
		{Domain: "example.com", Selector: "s2025", Signer: rsaKey},
		{Domain: "example.com", Selector: "s2026", Signer: rsaKey2},
	}
	signed := sign(t, mustNew(t, keys...), "example.com", []byte(msg1))
	if got := verify(t, signed, resolver(t, keys...)); len(got) != 2 {
		t.Fatalf("verified %v", got)
	}
	// A receiver that has only the new record still accepts the message.
	vs, _ := msgauth.VerifyWithOptions(bytes.NewReader(signed), &msgauth.VerifyOptions{LookupTXT: resolver(t, keys[1])})
	good := 0
	for _, v := range vs {
		if v.Err == nil {
			good++
		}
	}
	if good != 1 {
		t.Errorf("%d signatures verify with only the new record, want 1", good)
	}
}

func TestKeyChoice(t *testing.T) {
	testKeys(t)
	parent := Key{Domain: "example.com", Selector: "p", Signer: edKey, Subdomains: true}
	own := Key{Domain: "shop.example.com", Selector: "own", Signer: rsaKey}
	plain := Key{Domain: "example.org", Selector: "o", Signer: edKey}
	s := mustNew(t, parent, own, plain)
	for _, tc := range []struct {
		from, wantD, wantS string
	}{
		{"example.com", "example.com", "p"},
		{"EXAMPLE.COM", "example.com", "p"},
		{"mail.example.com", "example.com", "p"},
		{"a.b.example.com", "example.com", "p"},
		{"shop.example.com", "shop.example.com", "own"},
		{"x.shop.example.com", "example.com", "p"},
		{"example.org", "example.org", "o"},
		{"sub.example.org", "", ""}, // no subdomains for example.org
		{"example.net", "", ""},
		{"notexample.com", "", ""},
	} {
		sig, err := s.Sign(tc.from, []byte(strings.Replace(msg1, "billing@example.com", "x@"+tc.from, 1)))
		if err != nil {
			t.Fatal(err)
		}
		if tc.wantD == "" {
			if sig != nil {
				t.Errorf("%s: signed, want unsigned", tc.from)
			}
			continue
		}
		if !bytes.Contains(sig, []byte("d="+tc.wantD+";")) || !bytes.Contains(sig, []byte("s="+tc.wantS+";")) {
			t.Errorf("%s: want d=%s s=%s, got %s", tc.from, tc.wantD, tc.wantS, sig)
		}
	}
	signed, unsigned := s.Counts()
	if signed != 7 || unsigned != 3 {
		t.Errorf("counts: signed %d unsigned %d, want 7 and 3", signed, unsigned)
	}
}

func TestFromOversigned(t *testing.T) {
	testKeys(t)
	k := Key{Domain: "example.com", Selector: "s", Signer: edKey}
	signed := sign(t, mustNew(t, k), "example.com", []byte(msg1))
	if !regexp.MustCompile(`(?i)h=from:[^;]*:from;`).Match(bytes.ReplaceAll(signed, []byte("\r\n "), nil)) {
		t.Fatalf("From not over-signed:\n%s", signed)
	}
	// A From: added above the signed one must break the signature.
	forged := append([]byte("From: ceo@example.com\r\n"), signed...)
	vs, err := msgauth.VerifyWithOptions(bytes.NewReader(forged), &msgauth.VerifyOptions{LookupTXT: resolver(t, k)})
	if err != nil {
		t.Fatal(err)
	}
	if len(vs) != 1 || vs[0].Err == nil {
		t.Fatal("a second From: did not break the signature")
	}
}

func TestHeaderList(t *testing.T) {
	present := map[string]bool{"From": true, "Subject": true, "Message-Id": true, "X-Custom": true}
	got := strings.Join(headerKeys(nil, present), ":")
	if got != "From:Subject:Message-ID:From" {
		t.Errorf("default list %q", got)
	}
	got = strings.Join(headerKeys([]string{"x-custom", "From", "Subject", "Cc"}, present), ":")
	if got != "From:x-custom:Subject:From" {
		t.Errorf("custom list %q", got)
	}
}

func TestOptions(t *testing.T) {
	testKeys(t)
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	k := Key{Domain: "example.com", Selector: "s", Signer: rsaKey, Expiration: 72 * time.Hour,
		HeaderCanonicalization: "simple", BodyCanonicalization: "simple"}
	s, err := New([]Key{k}, func() time.Time { return now })
	if err != nil {
		t.Fatal(err)
	}
	sig, err := s.Sign("example.com", []byte(msg1))
	if err != nil {
		t.Fatal(err)
	}
	flat := string(bytes.ReplaceAll(sig, []byte("\r\n "), nil))
	if !strings.Contains(flat, fmt.Sprintf("x=%d;", now.Add(72*time.Hour).Unix())) {
		t.Errorf("no x= tag 72h ahead: %s", flat)
	}
	if !strings.Contains(flat, "c=simple/simple;") {
		t.Errorf("canonicalization: %s", flat)
	}
	def := sign(t, mustNew(t, Key{Domain: "example.com", Selector: "s", Signer: rsaKey}), "example.com", []byte(msg1))
	if !bytes.Contains(def, []byte("c=relaxed/relaxed;")) || !bytes.Contains(def, []byte("a=rsa-sha256;")) {
		t.Errorf("defaults: %s", def)
	}
	if _, err := New([]Key{{Domain: "example.com", Selector: "s", Signer: rsaKey, BodyCanonicalization: "loose"}}, nil); err == nil {
		t.Error("unknown canonicalization accepted")
	}
}

func TestParseKey(t *testing.T) {
	testKeys(t)
	pkcs1 := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(rsaKey)})
	pkcs8RSA, _ := MarshalKey(rsaKey)
	pkcs8Ed, _ := MarshalKey(edKey)
	ecKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	ecDER, _ := x509.MarshalPKCS8PrivateKey(ecKey)
	small, err := os.ReadFile("testdata/rsa768.pem")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		data    []byte
		wantErr string
	}{
		{"rsa pkcs1", pkcs1, ""},
		{"rsa pkcs8", pkcs8RSA, ""},
		{"ed25519 pkcs8", pkcs8Ed, ""},
		{"ecdsa", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: ecDER}), "unsupported key type"},
		{"rsa 768", small, "768"},
		{"certificate", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}), "not a private key"},
		{"not pem", []byte("hello"), "no PEM block"},
		{"corrupt", pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: []byte{1, 2, 3}}), "parse PRIVATE KEY"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := ParseKey(tc.data)
			if tc.wantErr == "" {
				if err != nil || k == nil {
					t.Fatalf("ParseKey: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
	if _, err := LoadKey(filepath.Join(t.TempDir(), "missing.pem")); err == nil {
		t.Error("missing file accepted")
	}
}

func TestZoneRecord(t *testing.T) {
	testKeys(t)
	for _, k := range []crypto.Signer{rsaKey, edKey} {
		line, err := ZoneRecord("example.com", "s2026", k.Public())
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(line, "s2026._domainkey.example.com. IN TXT ") {
			t.Fatalf("zone line %q", line)
		}
		var joined strings.Builder
		for _, m := range regexp.MustCompile(`"([^"]*)"`).FindAllStringSubmatch(line, -1) {
			if len(m[1]) > 255 {
				t.Errorf("string of %d bytes", len(m[1]))
			}
			joined.WriteString(m[1])
		}
		p := regexp.MustCompile(`p=([A-Za-z0-9+/=]+)`).FindStringSubmatch(joined.String())
		raw, err := base64.StdEncoding.DecodeString(p[1])
		if err != nil {
			t.Fatal(err)
		}
		switch pub := k.Public().(type) {
		case *rsa.PublicKey:
			got, err := x509.ParsePKIXPublicKey(raw)
			if err != nil || !pub.Equal(got) {
				t.Errorf("RSA p= is not the public key: %v", err)
			}
		case ed25519.PublicKey:
			if !bytes.Equal(raw, pub) {
				t.Error("Ed25519 p= is not the public key")
			}
		}
		if err := CheckRecord("example.com", "s2026", k, joined.String()); err != nil {
			t.Errorf("CheckRecord on its own record: %v", err)
		}
	}
	other, _ := RecordValue(rsaKey2.Public())
	if err := CheckRecord("example.com", "s2026", rsaKey, other); err == nil {
		t.Error("CheckRecord accepted another key's record")
	}
}

func TestGenerateKey(t *testing.T) {
	if k, err := GenerateKey("ed25519", 0); err != nil || CheckKey(k) != nil {
		t.Fatalf("ed25519: %v", err)
	}
	if k, err := GenerateKey("rsa", 1024); err != nil || k.Public().(*rsa.PublicKey).N.BitLen() != 1024 {
		t.Fatalf("rsa 1024: %v", err)
	}
	for _, bad := range []struct {
		algo string
		bits int
	}{{"rsa", 512}, {"rsa", 16384}, {"dsa", 0}} {
		if _, err := GenerateKey(bad.algo, bad.bits); err == nil {
			t.Errorf("GenerateKey(%s, %d) accepted", bad.algo, bad.bits)
		}
	}
}

// BenchmarkSign measures signing one message at the door, per key type and
// message size.
var tagT = regexp.MustCompile(`[;\s]t=([0-9]+)`)
var tagBH = regexp.MustCompile(`[;\s]bh=([^;]+)`)
var tagH = regexp.MustCompile(`[;\s]h=([^;]+)`)

// tags returns the values of re in sigs, one per signature.
func tags(re *regexp.Regexp, sigs []byte) []string {
	var out []string
	for _, m := range re.FindAllSubmatch(sigs, -1) {
		out = append(out, string(m[1]))
	}
	return out
}

// TestStreamEqualsSign signs each golden message, and a large one, whole
// with Sign and in pieces with Stream, cut at every kind of place: both
// verify, with the same body hash and signed fields, and are identical
// when signed within the same second (go-msgauth stamps t= itself).
func TestStreamEqualsSign(t *testing.T) {
	testKeys(t)
	keys := []Key{
		{Domain: "example.com", Selector: "rsa", Signer: rsaKey},
		{Domain: "example.com", Selector: "ed", Signer: edKey, BodyCanonicalization: "simple"},
	}
	s := mustNew(t, keys...)
	lookup := resolver(t, keys...)
	msgs := map[string][]byte{"big": benchMessage(3 << 20)}
	files, _ := filepath.Glob("testdata/messages/*.eml")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		msgs[filepath.Base(f)] = b
	}
	for name, msg := range msgs {
		// The header section with its empty line, as Stream wants it; a
		// message without a body is given whole.
		split := len(msg)
		if i := bytes.Index(msg, []byte("\r\n\r\n")); i >= 0 {
			split = i + 4
		}
		for _, chunk := range []int{1, 7, 4096, 64 << 10} {
			t.Run(fmt.Sprintf("%s/%d", name, chunk), func(t *testing.T) {
				if name == "big" && chunk < 4096 {
					t.Skip("byte-sized writes of 3 MB are slow and add nothing")
				}
				whole, err := s.Sign("example.com", msg)
				if err != nil {
					t.Fatal(err)
				}
				st, err := s.Stream("example.com", msg[:split])
				if err != nil {
					t.Fatal(err)
				}
				for rest := msg[split:]; len(rest) > 0; {
					n := min(chunk, len(rest))
					if _, err := st.Write(rest[:n]); err != nil {
						t.Fatal(err)
					}
					rest = rest[n:]
				}
				streamed, err := st.Finish()
				if err != nil {
					t.Fatal(err)
				}
				if got := verify(t, append(bytes.Clone(streamed), msg...), lookup); len(got) != 2 {
					t.Fatalf("%d streamed signatures verified, want 2", len(got))
				}
				for _, re := range []*regexp.Regexp{tagBH, tagH} {
					if a, b := tags(re, whole), tags(re, streamed); len(a) != 2 || strings.Join(a, "|") != strings.Join(b, "|") {
						t.Errorf("Sign %v, Stream %v", a, b)
					}
				}
				if strings.Join(tags(tagT, whole), ",") == strings.Join(tags(tagT, streamed), ",") && !bytes.Equal(whole, streamed) {
					t.Errorf("same second, different signatures:\n%s\n%s", whole, streamed)
				}
			})
		}
	}
}

// TestStreamNoKeyAndAbort: a domain without a key gets a Stream that signs
// nothing; an aborted Stream leaves no goroutine behind and refuses more.
func TestStreamNoKeyAndAbort(t *testing.T) {
	testKeys(t)
	s := mustNew(t, Key{Domain: "example.com", Selector: "s", Signer: edKey})
	st, err := s.Stream("example.org", []byte(msg1))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := st.Write([]byte("more\r\n")); err != nil {
		t.Fatal(err)
	}
	if sig, err := st.Finish(); err != nil || sig != nil {
		t.Fatalf("Finish = %q, %v; want nothing", sig, err)
	}
	if signed, unsigned := s.Counts(); signed != 0 || unsigned != 1 {
		t.Errorf("Counts = %d, %d; want 0, 1", signed, unsigned)
	}

	before := runtime.NumGoroutine()
	var streams []*Stream
	for range 10 {
		st, err := s.Stream("example.com", []byte(msg1))
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, st)
	}
	for _, st := range streams {
		st.Abort()
		st.Abort()
		if _, err := st.Write([]byte("x")); err == nil {
			t.Error("Write after Abort succeeded")
		}
		if _, err := st.Finish(); err == nil {
			t.Error("Finish after Abort succeeded")
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after aborting, %d before", runtime.NumGoroutine(), before)
		}
		runtime.Gosched()
	}
	if signed, unsigned := s.Counts(); signed != 0 || unsigned != 1 {
		t.Errorf("aborted streams counted: %d, %d", signed, unsigned)
	}
}

func BenchmarkSign(b *testing.B) {
	testKeys(b)
	for _, kt := range []struct {
		name string
		key  crypto.Signer
	}{{"rsa2048", rsaKey}, {"ed25519", edKey}} {
		for _, size := range []int{10 << 10, 1 << 20} {
			b.Run(fmt.Sprintf("%s/%dKB", kt.name, size>>10), func(b *testing.B) {
				msg := benchMessage(size)
				s := mustNew(b, Key{Domain: "example.com", Selector: "s", Signer: kt.key})
				b.SetBytes(int64(len(msg)))
				b.ReportAllocs()
				for b.Loop() {
					if _, err := s.Sign("example.com", msg); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}

func benchMessage(size int) []byte {
	var buf bytes.Buffer
	buf.WriteString(msg1[:strings.Index(msg1, "\r\n\r\n")+4])
	line := strings.Repeat("The quick brown fox jumps over the lazy dog. ", 2)[:74] + "\r\n"
	for buf.Len() < size {
		buf.WriteString(line)
	}
	return buf.Bytes()
}
