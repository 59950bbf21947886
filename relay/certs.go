package relay

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// defaultCertInterval is how often CertReloader looks at its files.
const defaultCertInterval = 5 * time.Second

// CertReloader serves the certificate of a pair of PEM files and loads
// them again when their content changes, as when cert-manager renews a
// Kubernetes Secret and the kubelet swaps the symlink under the mounted
// files. New TLS handshakes get the new certificate; connections already
// up keep theirs. A pair that does not load is logged and the current
// certificate kept. Use it through tls.Config.GetCertificate.
type CertReloader struct {
	// Interval is how often Start's goroutine reads the files; default 5s.
	// Content is compared, not times, so a renewal is seen whatever the
	// file system's timestamps do.
	Interval time.Duration
	Logger   *slog.Logger // default slog.Default()

	cert atomic.Pointer[tls.Certificate]

	mu       sync.Mutex // serialises loads; guards the fields below
	certFile string
	keyFile  string
	sum      [sha256.Size]byte // content last tried
	lastErr  error             // why the content last tried did not load
	failure  string            // the failure last logged, to log each once

	stopOnce sync.Once
	stop     chan struct{}
	done     chan struct{}
}

// NewCertReloader loads the pair in certFile and keyFile.
func NewCertReloader(certFile, keyFile string) (*CertReloader, error) {
	r := &CertReloader{}
	certPEM, keyPEM, err := readPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("tls certificate %s with key %s: %w", certFile, keyFile, err)
	}
	r.cert.Store(&cert)
	r.certFile, r.keyFile, r.sum = certFile, keyFile, pairSum(certPEM, keyPEM)
	return r, nil
}

// GetCertificate returns the current certificate; it has the signature of
// tls.Config.GetCertificate.
func (r *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.cert.Load(), nil
}

// Reload reads the files now and loads them if their content changed. The
// error says why the files, as they are now, are not being served: then
// the previous certificate still is.
func (r *CertReloader) Reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.load(r.certFile, r.keyFile)
}

// SetFiles serves the pair in other files from now on, as after a reload
// of the configuration; if they do not load, the current files and
// certificate stay.
func (r *CertReloader) SetFiles(certFile, keyFile string) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.load(certFile, keyFile)
}

// load reads and, if it is new, loads a pair. r.mu must be held.
func (r *CertReloader) load(certFile, keyFile string) error {
	same := certFile == r.certFile && keyFile == r.keyFile
	certPEM, keyPEM, err := readPair(certFile, keyFile)
	if err != nil {
		// Between the writes of a rotation, one file may be missing for
		// a moment: nothing is remembered, the next look tries again.
		r.logFailure(err)
		return err
	}
	sum := pairSum(certPEM, keyPEM)
	if same && sum == r.sum {
		if r.lastErr == nil {
			r.failure = ""
		}
		return r.lastErr
	}
	cert, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		err = fmt.Errorf("tls certificate %s with key %s: %w", certFile, keyFile, err)
		if same {
			// Tried once: it is not tried again until the files change.
			r.sum, r.lastErr = sum, err
		}
		r.logFailure(err)
		return err
	}
	r.cert.Store(&cert)
	r.certFile, r.keyFile, r.sum, r.lastErr, r.failure = certFile, keyFile, sum, nil, ""
	attrs := []any{"cert_file", certFile}
	if leaf := cert.Leaf; leaf != nil {
		attrs = append(attrs, "subject", leaf.Subject.String(), "serial", leaf.SerialNumber.String(),
			"not_after", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	r.logger().Info("TLS certificate loaded", attrs...)
	return nil
}

func (r *CertReloader) logFailure(err error) {
	if msg := err.Error(); msg != r.failure {
		r.failure = msg
		r.logger().Error("TLS certificate not reloaded; serving the previous one", "error", err)
	}
}

// Start looks at the files every Interval until Close.
func (r *CertReloader) Start() {
	interval := r.Interval
	if interval <= 0 {
		interval = defaultCertInterval
	}
	r.stop = make(chan struct{})
	r.done = make(chan struct{})
	go func() {
		defer close(r.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-r.stop:
				return
			case <-t.C:
				r.Reload()
			}
		}
	}()
}

// Close stops the goroutine of Start and waits for it.
func (r *CertReloader) Close() {
	if r.stop == nil {
		return
	}
	r.stopOnce.Do(func() { close(r.stop) })
	<-r.done
}

func (r *CertReloader) logger() *slog.Logger {
	if r.Logger == nil {
		return slog.Default()
	}
	return r.Logger
}

func readPair(certFile, keyFile string) (certPEM, keyPEM []byte, err error) {
	if certPEM, err = os.ReadFile(certFile); err != nil {
		return nil, nil, fmt.Errorf("tls certificate: %w", err)
	}
	if keyPEM, err = os.ReadFile(keyFile); err != nil {
		return nil, nil, fmt.Errorf("tls key: %w", err)
	}
	return certPEM, keyPEM, nil
}

// pairSum identifies the content of a pair of files.
func pairSum(certPEM, keyPEM []byte) [sha256.Size]byte {
	h := sha256.New()
	h.Write(binary.BigEndian.AppendUint64(nil, uint64(len(certPEM))))
	h.Write(certPEM)
	h.Write(keyPEM)
	var sum [sha256.Size]byte
	h.Sum(sum[:0])
	return sum
}
