package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/dkim"
	"smarthost/internal/mailproto"
	"smarthost/relay"
	"smarthost/relay/upstream"
)

// runDemo runs the whole job on loopback with nothing set up: a relay with
// a self-signed certificate and a demo user, and a built-in upstream that
// writes every delivered message into a folder.
func runDemo(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "127.0.0.1:2587", "submission address (loopback)")
	httpAddr := fs.String("http", "127.0.0.1:9091", "HTTP address for /healthz, /readyz and the admin API (loopback)")
	dir := fs.String("dir", "", "working folder (default: a new temporary folder)")
	verbose := fs.Bool("v", false, "log at debug level")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *dir == "" {
		d, err := os.MkdirTemp("", "smarthost-demo-")
		if err != nil {
			fmt.Fprintln(stderr, "demo:", err)
			return 1
		}
		// It holds private keys (TLS, DKIM) and the demo's mail: it goes
		// with the demo. A folder given with -dir is kept.
		defer os.RemoveAll(d)
		*dir = d
	}
	level := slog.LevelInfo
	if *verbose {
		level = slog.LevelDebug
	}
	logger := newLogger("text", level, stderr)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := demo(ctx, *listen, *httpAddr, *dir, logger, stdout); err != nil {
		fmt.Fprintln(stderr, "demo:", err)
		return 1
	}
	return 0
}

func demo(ctx context.Context, listen, httpAddr, dir string, logger *slog.Logger, stdout io.Writer) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	deliveredDir := filepath.Join(dir, "delivered")
	if err := os.MkdirAll(deliveredDir, 0o755); err != nil {
		return err
	}
	certFile, keyFile, err := writeSelfSigned(dir)
	if err != nil {
		return err
	}
	dkimKey, dkimFile, dkimZone, err := writeDemoDKIMKey(dir)
	if err != nil {
		return err
	}
	password := randomHex(8)
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.DefaultCost)
	if err != nil {
		return err
	}

	up, err := startFolderUpstream(deliveredDir, logger)
	if err != nil {
		return err
	}
	defer up.Close()

	hostname := "smarthost.demo"
	cfg := &config.Config{
		Hostname:    hostname,
		Queue:       config.Queue{Path: filepath.Join(dir, "queue.db"), RetryMin: time.Second, RetryMax: 30 * time.Second, MaxAge: time.Hour, Bounce: true, Workers: 4},
		TLSCertFile: certFile,
		TLSKeyFile:  keyFile,
		Listeners:   []relay.Listener{{Name: "submission", Address: listen, TLS: mailproto.TLSStartTLS, AuthRequired: true}},
		Limits: relay.Limits{
			MaxMessageBytes: config.DefaultMaxMessageSize, MaxRecipients: config.DefaultMaxRecipients, MaxConnections: 100,
			MaxConnectionsPerIP: config.DefaultMaxConnectionsPerIP, AuthTimeout: config.DefaultAuthTimeout,
			AuthFailuresPerIP: config.DefaultAuthFailuresPerIP, AuthFailureWindow: config.AuthFailureWindow,
			ReadTimeout: config.DefaultReadTimeout, DataTimeout: config.DefaultDataTimeout,
			MessageMemory: config.DefaultMessageMemory,
		},
		Users:       []relay.User{{Name: "demo", PasswordHash: hash, AllowedFrom: []string{"*@example.com"}}},
		Upstreams:   []upstream.Upstream{{Name: "local", Address: up.addr, TLS: mailproto.TLSNone, MaxConnections: 4}},
		Routes:      []upstream.Route{{FromDomain: "*", Upstreams: []string{"local"}}},
		DKIM:        []dkim.Key{dkimKey},
		HTTPAddress: httpAddr, // no admin token: loopback clients only
	}
	inst, err := start(cfg, logger)
	if err != nil {
		return err
	}
	addr := inst.addrs()[0]
	apiURL := "http://" + inst.httpAddr()

	sample := filepath.Join(dir, "hello.eml")
	msg := "From: Demo <demo@example.com>\r\nTo: Friend <friend@example.net>\r\nSubject: Hello from smarthost\r\n\r\nIt works: this message went through smarthost's queue to its upstream.\r\n"
	if err := os.WriteFile(sample, []byte(msg), 0o644); err != nil {
		inst.shutdown(context.Background())
		return err
	}

	fmt.Fprintf(stdout, `smarthost demo is running (press Ctrl-C to stop).

  submission  %[1]s  STARTTLS, then AUTH PLAIN or LOGIN
  certificate %[2]s  (self-signed for localhost and 127.0.0.1)
  user        demo
  password    %[3]s
  senders     *@example.com
  upstream    %[4]s  built in: writes each delivered message to a file
  queue       %[5]s
  admin API   %[12]s  (go run ./cmd/smarthost queue -server %[12]s list,
              or smarthost queue … after go install ./cmd/smarthost)
  dkim key    %[8]s

DKIM: messages from *@example.com are signed (d=%[9]s, s=%[10]s); the record to publish:
  %[11]s

Send a test message:

  curl --ssl-reqd --cacert %[2]s --url smtp://%[1]s --user 'demo:%[3]s' --mail-from demo@example.com --mail-rcpt friend@example.net --upload-file %[6]s

or with swaks:

  swaks --server %[1]s --tls --tls-ca-path %[2]s --auth PLAIN --auth-user demo --auth-password '%[3]s' --from demo@example.com --to friend@example.net

Delivered messages appear in %[7]s/
`, addr, certFile, password, up.addr, cfg.Queue.Path, sample, deliveredDir,
		dkimFile, dkimKey.Domain, dkimKey.Selector, dkimZone, apiURL)

	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), config.DefaultShutdownTimeout)
	defer cancel()
	return inst.shutdown(sctx)
}

func randomHex(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// writeDemoDKIMKey writes a fresh RSA-2048 signing key for example.com
// into dir and returns it with its file and the zone line that would
// publish it.
func writeDemoDKIMKey(dir string) (key dkim.Key, file, zone string, err error) {
	signer, err := dkim.GenerateKey("rsa", 2048)
	if err != nil {
		return key, "", "", err
	}
	pemData, err := dkim.MarshalKey(signer)
	if err != nil {
		return key, "", "", err
	}
	key = dkim.Key{Domain: "example.com", Selector: "demo", Signer: signer}
	zone, err = dkim.ZoneRecord(key.Domain, key.Selector, signer.Public())
	if err != nil {
		return key, "", "", err
	}
	file = filepath.Join(dir, "dkim-example.com.key")
	// A folder reused with -dir gets a new key, like its new certificate.
	if err := writeKeyFile(file, pemData, true); err != nil {
		return key, "", "", err
	}
	return key, file, zone, nil
}

// writeSelfSigned writes a certificate for localhost and 127.0.0.1 with
// its key into dir.
func writeSelfSigned(dir string) (certFile, keyFile string, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	serial, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		return "", "", err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "localhost"},
		DNSNames:              []string{"localhost"},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(30 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true, // so that clients can use it as its own trust anchor
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return "", "", err
	}
	certFile = filepath.Join(dir, "tls.crt")
	keyFile = filepath.Join(dir, "tls.key")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return "", "", err
	}
	return certFile, keyFile, nil
}

// folderUpstream is the demo's upstream: an SMTP server on loopback that
// writes each message it receives to a file.
type folderUpstream struct {
	addr string
	srv  *smtp.Server
}

func startFolderUpstream(dir string, logger *slog.Logger) (*folderUpstream, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	var seq atomic.Int64
	srv := smtp.NewServer(smtp.BackendFunc(func(*smtp.Conn) (smtp.Session, error) {
		return &folderSession{dir: dir, seq: &seq, log: logger}, nil
	}))
	srv.Domain = "upstream.demo"
	srv.MaxMessageBytes = 64 << 20
	srv.ErrorLog = slog.NewLogLogger(logger.Handler(), slog.LevelDebug)
	go srv.Serve(ln)
	return &folderUpstream{addr: ln.Addr().String(), srv: srv}, nil
}

func (u *folderUpstream) Close() error { return u.srv.Close() }

type folderSession struct {
	dir  string
	seq  *atomic.Int64
	log  *slog.Logger
	from string
	to   []string
}

func (s *folderSession) Mail(from string, _ *smtp.MailOptions) error { s.from = from; return nil }
func (s *folderSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	s.to = append(s.to, to)
	return nil
}
func (s *folderSession) Reset()        { s.from, s.to = "", nil }
func (s *folderSession) Logout() error { return nil }

func (s *folderSession) Data(r io.Reader) error {
	name := filepath.Join(s.dir, fmt.Sprintf("%s-%03d.eml", time.Now().Format("20060102-150405"), s.seq.Add(1)))
	// Written under a temporary name and renamed, so that whoever watches
	// the folder never reads a half-written message.
	tmp := name + ".part"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	_, err = io.Copy(f, r)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, name)
	}
	if err != nil {
		os.Remove(tmp)
		return err
	}
	s.log.Info("demo upstream: message delivered", "file", name, "from", s.from, "to", s.to)
	return nil
}
