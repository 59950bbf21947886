package dkim

import (
	"crypto/ed25519"
	"crypto/rsa"
	"testing"
)

func FuzzParseKey(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		k, err := ParseKey(data)
		if err != nil {
			if k != nil {
				t.Fatalf("key %T returned with error %v", k, err)
			}
			return
		}
		switch pub := k.Public().(type) {
		case *rsa.PublicKey:
			if pub.N.BitLen() < MinRSABits {
				t.Fatalf("accepted a %d-bit RSA key", pub.N.BitLen())
			}
		case ed25519.PublicKey:
			if len(pub) != ed25519.PublicKeySize {
				t.Fatalf("accepted an Ed25519 key of %d bytes", len(pub))
			}
		default:
			t.Fatalf("accepted a %T key", pub)
		}
		// What was accepted can be published and written back.
		if _, err := RecordValue(k.Public()); err != nil {
			t.Fatalf("RecordValue: %v", err)
		}
		if _, err := MarshalKey(k); err != nil {
			t.Fatalf("MarshalKey: %v", err)
		}
	})
}
