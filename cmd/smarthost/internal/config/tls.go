package config

import (
	"crypto/tls"
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
	// The pair is read as one secret, as a kubernetes.io/tls Secret
	// holds it: where the key is absent, so is its certificate.
	reads := t.readsSecret("tls")
	var certPEM, keyPEM []byte
	if certOK && !reads {
		t.secretNamed("cert_file", certFile)
	} else if certOK {
		certPEM = t.readFile("cert_file", certFile)
	} else if user != "" && !t.has("cert_file") {
		t.errorf("cert_file", "required: %s", user)
	}
	if keyOK && !reads {
		t.secretNamed("key_file", keyFile)
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
