package dkim

import (
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	msgauth "github.com/emersion/go-msgauth/dkim"
)

// MinRSABits is the smallest RSA key accepted: RFC 8301 section 3.2 forbids
// signing with less than 1024 bits.
const MinRSABits = 1024

// LoadKey reads a PEM private key: RSA as PKCS#1 ("RSA PRIVATE KEY") or
// PKCS#8 ("PRIVATE KEY"), or Ed25519 as PKCS#8.
func LoadKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return ParseKey(data)
}

// ParseKey parses what LoadKey reads and checks it with CheckKey.
func ParseKey(data []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block found")
	}
	var key any
	var err error
	switch block.Type {
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
	default:
		return nil, fmt.Errorf("PEM block %q is not a private key (want RSA PRIVATE KEY or PRIVATE KEY)", block.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parse %s: %w", block.Type, err)
	}
	signer, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("unsupported key type %T", key)
	}
	if err := CheckKey(signer); err != nil {
		return nil, err
	}
	return signer, nil
}

// CheckKey accepts RSA keys of at least MinRSABits and Ed25519 keys.
func CheckKey(k crypto.Signer) error {
	switch pub := k.Public().(type) {
	case *rsa.PublicKey:
		if bits := pub.N.BitLen(); bits < MinRSABits {
			return fmt.Errorf("RSA key has %d bits, at least %d are required", bits, MinRSABits)
		}
		return nil
	case ed25519.PublicKey:
		return nil
	}
	return fmt.Errorf("unsupported key type %T: DKIM signs with RSA or Ed25519", k.Public())
}

// GenerateKey makes a new key: algo "rsa" with bits (default 2048) or
// "ed25519".
func GenerateKey(algo string, bits int) (crypto.Signer, error) {
	switch algo {
	case "rsa", "":
		if bits == 0 {
			bits = 2048
		}
		if bits < MinRSABits || bits > 8192 {
			return nil, fmt.Errorf("RSA key size %d is outside %d…8192", bits, MinRSABits)
		}
		return rsa.GenerateKey(rand.Reader, bits)
	case "ed25519":
		_, k, err := ed25519.GenerateKey(rand.Reader)
		return k, err
	}
	return nil, fmt.Errorf("unknown algorithm %q (want rsa or ed25519)", algo)
}

// MarshalKey encodes a private key as PKCS#8 PEM.
func MarshalKey(k crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// RecordValue is the DNS TXT record that publishes pub (RFC 6376 section
// 3.6.1): p= is the SubjectPublicKeyInfo for RSA, and the raw 32-byte key
// for Ed25519 (RFC 8463 section 4.2).
func RecordValue(pub crypto.PublicKey) (string, error) {
	switch k := pub.(type) {
	case *rsa.PublicKey:
		der, err := x509.MarshalPKIXPublicKey(k)
		if err != nil {
			return "", err
		}
		return "v=DKIM1; k=rsa; p=" + base64.StdEncoding.EncodeToString(der), nil
	case ed25519.PublicKey:
		return "v=DKIM1; k=ed25519; p=" + base64.StdEncoding.EncodeToString(k), nil
	}
	return "", fmt.Errorf("unsupported key type %T", pub)
}

// ZoneRecord is a zone-file line publishing pub at selector._domainkey.domain,
// its value split into strings of at most 255 bytes as a TXT record
// requires (RFC 1035 section 3.3.14).
func ZoneRecord(domain, selector string, pub crypto.PublicKey) (string, error) {
	value, err := RecordValue(pub)
	if err != nil {
		return "", err
	}
	var parts []string
	for len(value) > 255 {
		parts = append(parts, `"`+value[:255]+`"`)
		value = value[255:]
	}
	parts = append(parts, `"`+value+`"`)
	name := RecordName(domain, selector) + "."
	if len(parts) == 1 {
		return name + " IN TXT " + parts[0], nil
	}
	return name + " IN TXT ( " + strings.Join(parts, " ") + " )", nil
}

// RecordName is where a selector's record lives in DNS.
func RecordName(domain, selector string) string {
	return selector + "._domainkey." + strings.TrimSuffix(domain, ".")
}

// CheckRecord tells whether record (the TXT value, with its strings
// joined) publishes the public half of key: it signs a probe message and
// verifies it against the record with go-msgauth, as a receiver would.
func CheckRecord(domain, selector string, key crypto.Signer, record string) error {
	s, err := New([]Key{{Domain: domain, Selector: selector, Signer: key}}, time.Now)
	if err != nil {
		return err
	}
	probe := []byte("From: probe@" + domain + "\r\nSubject: DKIM key check\r\n\r\nprobe\r\n")
	sig, err := s.Sign(domain, probe)
	if err != nil {
		return err
	}
	name := RecordName(domain, selector)
	verifications, err := msgauth.VerifyWithOptions(strings.NewReader(string(sig)+string(probe)), &msgauth.VerifyOptions{
		LookupTXT: func(q string) ([]string, error) {
			if !strings.EqualFold(q, name) {
				return nil, fmt.Errorf("unexpected lookup %s", q)
			}
			return []string{record}, nil
		},
	})
	if err != nil {
		return err
	}
	if len(verifications) != 1 {
		return fmt.Errorf("%d verifications of the probe, want 1", len(verifications))
	}
	if err := verifications[0].Err; err != nil {
		return fmt.Errorf("record does not match the key: %w", err)
	}
	return nil
}
