package main

import (
	"crypto/tls"
	"crypto/x509"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/emersion/go-smtp"

	"smarthost/internal/testpki"
)

// The benchmark's CA issues a certificate that a client verifying
// 127.0.0.1 accepts, and the TLS upstream serves it: a message sent over
// implicit TLS arrives and is counted.
func TestPKIAndTLSSink(t *testing.T) {
	pki, err := testpki.NewIn(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(pki.KeyFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v, %v", fi.Mode(), err)
	}
	sink, err := startDiscardTLS(pki.ServerTLS())
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	caPEM, err := os.ReadFile(pki.CAFile)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		t.Fatal("ca.pem holds no certificate")
	}
	// A client that trusts only the system roots refuses the certificate.
	if c, err := smtp.DialTLS(sink.Addr, &tls.Config{ServerName: "127.0.0.1"}); err == nil {
		err = c.Hello("client.test")
		c.Close()
		if err == nil {
			t.Error("the certificate verified without the benchmark's CA")
		}
	}
	c, err := smtp.DialTLS(sink.Addr, &tls.Config{ServerName: "127.0.0.1", RootCAs: roots})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SendMail(mailFrom, []string{rcptTo}, strings.NewReader("Subject: t\r\n\r\nbody\r\n")); err != nil {
		t.Fatal(err)
	}
	if _, ok := c.TLSConnectionState(); !ok {
		t.Error("not TLS")
	}
	if n := sink.Counter.Count(); n != 1 {
		t.Errorf("sink counted %d, want 1", n)
	}
}

func TestProductionConfig(t *testing.T) {
	var c struct {
		TLS struct {
			CertFile string `toml:"cert_file"`
			KeyFile  string `toml:"key_file"`
		} `toml:"tls"`
		Listen []struct{ Address, TLS, Auth string }
		User   []struct {
			Name         string
			PasswordHash string   `toml:"password_hash"`
			AllowedFrom  []string `toml:"allowed_from"`
		}
		Upstream []struct {
			Address, TLS   string
			CAFile         string `toml:"ca_file"`
			MaxConnections int    `toml:"max_connections"`
		}
		DKIM []struct {
			Domain  string
			KeyFile string `toml:"key_file"`
		} `toml:"dkim"`
	}
	files := &prodFiles{PKI: &testpki.PKI{CAFile: "/w/ca.pem", CertFile: "/w/tls.crt", KeyFile: "/w/tls.key"}, Hash: "$2a$10$x"}
	text := productionConfig("/w", "127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3", 20, files, "/w/k.key")
	md, err := toml.Decode(text, &c)
	if err != nil {
		t.Fatalf("config does not decode: %v\n%s", err, text)
	}
	if len(c.Listen) != 1 || c.Listen[0].TLS != "starttls" || c.Listen[0].Auth != "required" || md.IsDefined("listen", "trusted_networks") {
		t.Errorf("listener: %+v", c.Listen)
	}
	if c.TLS.CertFile != "/w/tls.crt" || c.TLS.KeyFile != "/w/tls.key" {
		t.Errorf("tls: %+v", c.TLS)
	}
	if len(c.User) != 1 || c.User[0].Name != prodUser || c.User[0].PasswordHash != "$2a$10$x" || !slices.Equal(c.User[0].AllowedFrom, []string{"*@" + dkimDomain}) {
		t.Errorf("user: %+v", c.User)
	}
	if len(c.Upstream) != 1 || c.Upstream[0].TLS != "implicit" || c.Upstream[0].CAFile != "/w/ca.pem" || c.Upstream[0].Address != "127.0.0.1:3" || c.Upstream[0].MaxConnections != 20 {
		t.Errorf("upstream: %+v", c.Upstream)
	}
	if len(c.DKIM) != 1 || c.DKIM[0].KeyFile != "/w/k.key" || c.DKIM[0].Domain != dkimDomain {
		t.Errorf("dkim: %+v", c.DKIM)
	}
}

func TestLoadArgs(t *testing.T) {
	files := &prodFiles{PKI: &testpki.PKI{CAFile: "/w/ca.pem"}, PassFile: "/w/password"}
	plain := strings.Join(loadArgs("127.0.0.1:1", Point{Size: 10 << 10, Sessions: 10}, false, files), " ")
	for _, want := range []string{"-addr 127.0.0.1:1", "-c 10", "-size 10240", "-per-conn 1", "-json"} {
		if !strings.Contains(plain, want) {
			t.Errorf("plain args %q lack %q", plain, want)
		}
	}
	if strings.Contains(plain, "-tls") || strings.Contains(plain, "-user") {
		t.Errorf("plain args %q use TLS or AUTH", plain)
	}
	full := strings.Join(loadArgs("127.0.0.1:1", Point{Size: 10 << 10, Sessions: 10}, true, files), " ")
	if !strings.Contains(full, "-tls starttls -ca /w/ca.pem -user "+prodUser+" -pass-file /w/password") {
		t.Errorf("production args %q", full)
	}
}

// The production table pairs each point's plain and production-shaped
// runs, with the tax as ratios, and the matrix's smarthost where it ran.
func TestProductionTable(t *testing.T) {
	a := Point{Size: 10 << 10, Sessions: 10}
	b := Point{Size: 100 << 10, Sessions: 10}
	prod := []Result{
		{Target: prodPlain, Point: a, Messages: 1000, Arrived: 1000, Elapsed: 2 * time.Second, CPU: time.Second, PeakRSS: 20 << 20},
		{Target: prodFull, Point: a, Messages: 1000, Arrived: 1000, Elapsed: 4 * time.Second, CPU: 3 * time.Second, PeakRSS: 24 << 20},
		{Target: prodPlain, Point: b, Messages: 1000, Arrived: 1000, Elapsed: 5 * time.Second, CPU: 4 * time.Second},
		{Target: prodFull, Point: b, Messages: 1000, Arrived: 7, Err: "sink: 7 of 1000"},
	}
	matrix := []Result{{Target: "smarthost", Point: a, Messages: 1000, Arrived: 1000, Elapsed: time.Second}}
	lines := strings.Split(strings.TrimSpace(productionTable(prod, matrix)), "\n")
	if len(lines) != 4 {
		t.Fatalf("%d lines:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	cells := func(line string) []string { return strings.Split(strings.Trim(line, "| "), " | ") }
	head := cells(lines[0])
	for i, want := range map[int]map[string]string{
		2: {"size": "10 KB", "plain msgs/s": "500", "production msgs/s": "250", "throughput tax": "0.50×",
			"plain CPU ms/msg": "1.00", "production CPU ms/msg": "3.00", "CPU tax": "3.00×",
			"plain peak RSS MB": "20", "production peak RSS MB": "24", "matrix smarthost msgs/s (smtp-source)": "1000"},
		3: {"size": "100 KB", "plain msgs/s": "200", "production msgs/s": "FAIL (7/1000)", "throughput tax": "–",
			"plain CPU ms/msg": "4.00", "production CPU ms/msg": "–", "CPU tax": "–", "matrix smarthost msgs/s (smtp-source)": "–"},
	} {
		row := cells(lines[i])
		for col, w := range want {
			j := slices.Index(head, col)
			if j < 0 {
				t.Fatalf("no column %q in %v", col, head)
			}
			if row[j] != w {
				t.Errorf("row %d %s = %q, want %q", i, col, row[j], w)
			}
		}
	}
}
