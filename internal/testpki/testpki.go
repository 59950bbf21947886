// Package testpki makes a throwaway certificate authority and server
// certificates for tests that need real TLS on loopback.
package testpki

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// PKI is a test CA with one server certificate for localhost, 127.0.0.1
// and ::1, also written to files in a temporary directory.
type PKI struct {
	CAPool   *x509.CertPool
	CACert   *x509.Certificate
	CAFile   string // PEM of the CA certificate
	CertFile string // PEM of the server certificate
	KeyFile  string // PEM of the server key
	Cert     tls.Certificate

	caKey *ecdsa.PrivateKey
	dir   string
}

// New creates a CA and a server certificate signed by it, in a temporary
// directory of t's.
func New(t testing.TB) *PKI {
	t.Helper()
	p, err := NewIn(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// NewIn is New writing its files into dir, for a program that is not a
// test (the benchmarks): ca.pem, server.crt and server.key.
func NewIn(dir string) (*PKI, error) {
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "smarthost test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return nil, err
	}
	caCert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	p := &PKI{CAPool: x509.NewCertPool(), CACert: caCert, caKey: caKey, dir: dir}
	p.CAPool.AddCert(caCert)
	if p.CAFile, err = p.write("ca.pem", "CERTIFICATE", der); err != nil {
		return nil, err
	}
	if p.Cert, p.CertFile, p.KeyFile, err = p.issue("server", "localhost"); err != nil {
		return nil, err
	}
	return p, nil
}

// Issue signs a new server certificate for the given DNS name plus the
// loopback addresses and writes it as name.crt and name.key.
func (p *PKI) Issue(t testing.TB, name, dnsName string) (cert tls.Certificate, certFile, keyFile string) {
	t.Helper()
	cert, certFile, keyFile, err := p.issue(name, dnsName)
	if err != nil {
		t.Fatal(err)
	}
	return cert, certFile, keyFile
}

func (p *PKI) issue(name, dnsName string) (cert tls.Certificate, certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return cert, "", "", err
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: dnsName},
		DNSNames:     []string{dnsName},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.CACert, &key.PublicKey, p.caKey)
	if err != nil {
		return cert, "", "", err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return cert, "", "", err
	}
	if certFile, err = p.write(name+".crt", "CERTIFICATE", der); err != nil {
		return cert, "", "", err
	}
	if keyFile, err = p.write(name+".key", "PRIVATE KEY", keyDER); err != nil {
		return cert, "", "", err
	}
	cert, err = tls.LoadX509KeyPair(certFile, keyFile)
	return cert, certFile, keyFile, err
}

// ServerTLS is a server configuration presenting the server certificate.
func (p *PKI) ServerTLS() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.Cert}, MinVersion: tls.VersionTLS12}
}

// ClientTLS is a client configuration trusting only the test CA.
func (p *PKI) ClientTLS() *tls.Config {
	return &tls.Config{RootCAs: p.CAPool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
}

func (p *PKI) write(name, typ string, der []byte) (string, error) {
	path := filepath.Join(p.dir, name)
	data := pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
	return path, os.WriteFile(path, data, 0o600)
}
