package testpki

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// Secret is a directory laid out as the kubelet mounts a Kubernetes Secret
// holding a certificate: tls.crt and tls.key are symlinks through "..data",
// itself a symlink to the current version's directory, and Update renames a
// new "..data" over the old one, so a reader sees one pair or the other.
type Secret struct {
	t   testing.TB
	Dir string
	n   int
}

// NewSecret makes a Secret holding copies of certFile and keyFile.
func NewSecret(t testing.TB, certFile, keyFile string) *Secret {
	t.Helper()
	s := &Secret{t: t, Dir: t.TempDir()}
	s.Update(certFile, keyFile)
	for _, name := range []string{"tls.crt", "tls.key"} {
		if err := os.Symlink(filepath.Join("..data", name), filepath.Join(s.Dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	return s
}

// CertFile is the path a server is configured with for the certificate.
func (s *Secret) CertFile() string { return filepath.Join(s.Dir, "tls.crt") }

// KeyFile is the path a server is configured with for the key.
func (s *Secret) KeyFile() string { return filepath.Join(s.Dir, "tls.key") }

// Update writes a new version and swaps it in atomically.
func (s *Secret) Update(certFile, keyFile string) {
	s.t.Helper()
	s.n++
	version := fmt.Sprintf("..v%d", s.n)
	if err := os.Mkdir(filepath.Join(s.Dir, version), 0o700); err != nil {
		s.t.Fatal(err)
	}
	for name, src := range map[string]string{"tls.crt": certFile, "tls.key": keyFile} {
		data, err := os.ReadFile(src)
		if err != nil {
			s.t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(s.Dir, version, name), data, 0o600); err != nil {
			s.t.Fatal(err)
		}
	}
	tmp := filepath.Join(s.Dir, "..data_tmp")
	if err := os.Symlink(version, tmp); err != nil {
		s.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(s.Dir, "..data")); err != nil {
		s.t.Fatal(err)
	}
}
