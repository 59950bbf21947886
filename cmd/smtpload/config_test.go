package main

import (
	"bytes"
	"context"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"smarthost/internal/testpki"
)

func noEnv(string) string { return "" }

func envWith(kv ...string) func(string) string {
	return func(k string) string {
		for i := 0; i+1 < len(kv); i += 2 {
			if kv[i] == k {
				return kv[i+1]
			}
		}
		return ""
	}
}

func TestParseFlagsDefaults(t *testing.T) {
	cfg, err := ParseFlags(nil, noEnv)
	if err != nil {
		t.Fatal(err)
	}
	want := DefaultConfig()
	if cfg.Addr != "127.0.0.1:587" || cfg.Concurrency != 10 || cfg.Messages != 1000 || cfg.Size != 10<<10 ||
		cfg.PerConn != 0 || cfg.TLS != TLSNone || cfg.Timeout != 30*time.Second || cfg.Rate != 0 ||
		!slices.Equal(cfg.To, want.To) || cfg.From != want.From || cfg.Helo != "localhost" || cfg.JSON || cfg.User != "" {
		t.Errorf("defaults: %+v", cfg)
	}
}

func TestParseFlagsValues(t *testing.T) {
	pki := testpki.New(t)
	passFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(passFile, []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := ParseFlags([]string{
		"-addr", "relay.example.com:465", "-c", "3", "-n", "7", "-size", "2MB", "-per-conn", "1",
		"-tls", "implicit", "-ca", pki.CAFile, "-user", "app", "-pass-file", passFile,
		"-from", "app@example.com", "-to", "a@example.net,b@example.net", "-to", "c@example.net",
		"-helo", "client.example.com", "-timeout", "5s", "-rate", "2.5", "-json",
	}, envWith("SMTPLOAD_PASSWORD", "from-env"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Addr != "relay.example.com:465" || cfg.Concurrency != 3 || cfg.Messages != 7 || cfg.Size != 2<<20 ||
		cfg.PerConn != 1 || cfg.TLS != TLSImplicit || cfg.CAFile != pki.CAFile || cfg.User != "app" ||
		cfg.Password != "from-file" || cfg.From != "app@example.com" || cfg.Helo != "client.example.com" ||
		cfg.Timeout != 5*time.Second || cfg.Rate != 2.5 || !cfg.JSON {
		t.Errorf("parsed: %+v", cfg)
	}
	if want := []string{"a@example.net", "b@example.net", "c@example.net"}; !slices.Equal(cfg.To, want) {
		t.Errorf("-to: %q, want %q", cfg.To, want)
	}
	conf, err := cfg.TLSConfig()
	if err != nil || conf.ServerName != "relay.example.com" || conf.RootCAs == nil || conf.InsecureSkipVerify {
		t.Errorf("TLSConfig: %+v, %v", conf, err)
	}

	// The password from the environment, under the default and a chosen name.
	cfg, err = ParseFlags([]string{"-user", "app"}, envWith("SMTPLOAD_PASSWORD", "from-env"))
	if err != nil || cfg.Password != "from-env" {
		t.Errorf("default -pass-env: %q, %v", cfg.Password, err)
	}
	cfg, err = ParseFlags([]string{"-user", "app", "-pass-env", "MY_PW"}, envWith("MY_PW", "mine"))
	if err != nil || cfg.Password != "mine" {
		t.Errorf("-pass-env MY_PW: %q, %v", cfg.Password, err)
	}
}

func TestParseFlagsErrors(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	notPEM := filepath.Join(dir, "not.pem")
	for _, f := range []string{empty, notPEM} {
		if err := os.WriteFile(f, []byte("\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	env := envWith("SMTPLOAD_PASSWORD", "pw")
	tests := []struct {
		args []string
		flag string // the flag the message must name
		env  func(string) string
	}{
		{[]string{"-addr", "localhost"}, "-addr", env},
		{[]string{"-addr", ":587"}, "-addr", env},
		{[]string{"-c", "0"}, "-c", env},
		{[]string{"-c", "ten"}, "-c", env},
		{[]string{"-n", "-1"}, "-n", env},
		{[]string{"-size", "10GB"}, "-size", env},
		{[]string{"-size", "12XB"}, "-size", env},
		{[]string{"-size", "100"}, "-size", env},
		{[]string{"-size", "1000MB"}, "-size", env},
		{[]string{"-per-conn", "-2"}, "-per-conn", env},
		{[]string{"-tls", "ssl"}, "-tls", env},
		{[]string{"-ca", notPEM}, "-ca", env},
		{[]string{"-tls", "starttls", "-ca", filepath.Join(dir, "missing.pem")}, "-ca", env},
		{[]string{"-tls", "starttls", "-ca", notPEM}, "-ca", env},
		{[]string{"-insecure"}, "-insecure", env},
		{[]string{"-tls", "implicit", "-insecure", "-ca", notPEM}, "-insecure", env},
		{[]string{"-user", "app"}, "-user", noEnv},
		{[]string{"-user", "app", "-pass-env", "OTHER"}, "-user", env},
		{[]string{"-user", "app", "-pass-env", ""}, "-pass-env", env},
		{[]string{"-pass-file", empty}, "-pass-file", env},
		{[]string{"-pass-env", "X"}, "-pass-env", env},
		{[]string{"-user", "app", "-pass-file", empty}, "-pass-file", env},
		{[]string{"-user", "app", "-pass-file", filepath.Join(dir, "missing")}, "-pass-file", env},
		{[]string{"-user", "app", "-pass-env", "X", "-pass-file", empty}, "-pass-file", env},
		{[]string{"-from", "nobody"}, "-from", env},
		{[]string{"-from", "a b@example.com"}, "-from", env},
		{[]string{"-to", ","}, "-to", env},
		{[]string{"-to", "a@example.com,<b@example.com>"}, "-to", env},
		{[]string{"-helo", ""}, "-helo", env},
		{[]string{"-timeout", "0s"}, "-timeout", env},
		{[]string{"-timeout", "30"}, "-timeout", env},
		{[]string{"-rate", "-1"}, "-rate", env},
		{[]string{"-rate", "NaN"}, "-rate", env},
		{[]string{"-password", "x"}, "-password", env},
		{[]string{"extra"}, `"extra"`, env},
	}
	for _, tt := range tests {
		t.Run(strings.Join(tt.args, " "), func(t *testing.T) {
			_, err := ParseFlags(tt.args, tt.env)
			if err == nil {
				t.Fatal("accepted")
			}
			msg := err.Error()
			if !strings.Contains(msg, tt.flag) || strings.Contains(msg, "\n") {
				t.Errorf("error %q: want one line naming %s", msg, tt.flag)
			}

			// Through the command: exit status 2 and the same line.
			var stdout, stderr bytes.Buffer
			if code := run(context.Background(), tt.args, &stdout, &stderr, tt.env); code != 2 {
				t.Errorf("exit status %d, want 2", code)
			}
			if lines := strings.Count(stderr.String(), "\n"); lines != 1 || !strings.Contains(stderr.String(), msg) {
				t.Errorf("stderr %q: want one line with %q", stderr.String(), msg)
			}
			if stdout.Len() != 0 {
				t.Errorf("stdout %q, want nothing", stdout.String())
			}
		})
	}
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		ok   bool
	}{
		{"512", 512, true},
		{"512B", 512, true},
		{"10KB", 10 << 10, true},
		{"10kb", 10 << 10, true},
		{"3 MB", 3 << 20, true},
		{"1MiB", 1 << 20, true},
		{"", 0, false},
		{"KB", 0, false},
		{"1.5MB", 0, false},
		{"-1KB", 0, false},
		{"1GB", 1 << 30, true},
		{"99999999999999999999", 0, false},
		{"9999999999999999MB", 0, false},
	}
	for _, tt := range tests {
		got, err := ParseSize(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseSize(%q) = %d, %v; want %d, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

// TestUsage checks that -h prints the usage on stdout with status 0, and
// that the usage names every flag with the default the flag really has.
func TestUsage(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"-h"}, &stdout, &stderr, noEnv); code != 0 {
		t.Fatalf("exit status %d, stderr %q", code, stderr.String())
	}
	out := stdout.String()
	if out != usage {
		t.Errorf("-h printed %q, want the usage text", out)
	}
	cfg := DefaultConfig()
	pw := passwordSource{env: defaultPassEnv}
	fs := newFlagSet(&cfg, &pw)
	n := 0
	fs.VisitAll(func(f *flag.Flag) {
		n++
		// The flag's paragraph: from "  -name " to the next flag.
		i := strings.Index(out, "\n  -"+f.Name+" ")
		if i < 0 {
			t.Errorf("usage does not describe -%s", f.Name)
			return
		}
		para := out[i+1:]
		if j := strings.Index(para[1:], "\n  -"); j >= 0 {
			para = para[:j+1]
		}
		def := f.DefValue
		switch {
		case def == "" && f.Name == "user":
			def = "no AUTH"
		case def == "":
			def = "none"
		}
		if !strings.Contains(para, "["+def+"]") {
			t.Errorf("usage of -%s does not give its default [%s]: %q", f.Name, def, para)
		}
	})
	if n < 17 {
		t.Errorf("only %d flags defined", n)
	}
	for _, s := range []string{"Examples:", "Exit status"} {
		if !strings.Contains(out, s) {
			t.Errorf("usage lacks %q", s)
		}
	}
	if strings.Count(out, "smtpload -addr") < 2 {
		t.Errorf("usage has fewer than two examples")
	}
}
