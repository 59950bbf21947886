package config

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"

	"smarthost/internal/mailproto"
	"smarthost/relay"
)

// servingTLS checks [tls]; the pair is required when a listener speaks TLS.
func (p *parser) servingTLS(t *table, listeners []relay.Listener) (certFile, keyFile string) {
	var user string // first listener that needs the certificate
	for i, l := range listeners {
		if l.TLS == mailproto.TLSStartTLS || l.TLS == mailproto.TLSImplicit {
			user = fmt.Sprintf("listen[%d] uses tls = %q", i, l.TLS)
			break
		}
	}
	certFile, certOK := t.str("cert_file")
	keyFile, keyOK := t.str("key_file")
	var certPEM, keyPEM []byte
	if certOK {
		certPEM = t.readFile("cert_file", certFile)
	} else if user != "" && !t.has("cert_file") {
		t.errorf("cert_file", "required: %s", user)
	}
	if keyOK && !t.readsSecret("tls") {
		t.secretNamed("key_file", keyFile)
		if certPEM != nil {
			if err := checkCertificates(certPEM); err != nil {
				t.errorf("cert_file", "%s: %v", certFile, err)
			}
		}
	} else if keyOK {
		keyPEM = t.readFile("key_file", keyFile)
	} else if user != "" && !t.has("key_file") {
		t.errorf("key_file", "required: %s", user)
	}
	if certPEM != nil && keyPEM != nil {
		if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
			t.errorf("cert_file", "does not load with key_file: %v", err)
		}
	}
	t.done()
	return certFile, keyFile
}

// checkCertificates checks that a PEM file holds a certificate chain, as
// tls.X509KeyPair would, for when its key is not read.
func checkCertificates(data []byte) error {
	found := false
	for {
		var b *pem.Block
		if b, data = pem.Decode(data); b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		if _, err := x509.ParseCertificate(b.Bytes); err != nil {
			return err
		}
		found = true
	}
	if !found {
		return errors.New("no PEM CERTIFICATE block")
	}
	return nil
}
