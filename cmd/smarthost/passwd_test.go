package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"smarthost/cmd/smarthost/internal/config/configtest"
)

func runPasswdTest(t *testing.T, args []string, input string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code = runPasswd(args, strings.NewReader(input), &out, &errOut)
	return code, out.String(), errOut.String()
}

func TestPasswd(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		input    string
		password string // the password the hash must verify
		cost     int
	}{
		{"line", []string{"-cost", "4"}, "correct horse\n", "correct horse", 4},
		{"no newline at end", []string{"-cost", "4"}, "s3cret", "s3cret", 4},
		{"CRLF and more lines", []string{"-cost", "4"}, "first\r\nsecond\n", "first", 4},
		{"spaces kept", []string{"-cost", "4"}, " pad \n", " pad ", 4},
		{"default cost", nil, "pw\n", "pw", bcrypt.DefaultCost},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runPasswdTest(t, tt.args, tt.input)
			if code != 0 {
				t.Fatalf("exit %d, stderr %q", code, stderr)
			}
			hash := []byte(strings.TrimSuffix(stdout, "\n"))
			if err := bcrypt.CompareHashAndPassword(hash, []byte(tt.password)); err != nil {
				t.Errorf("hash %q does not verify %q: %v", hash, tt.password, err)
			}
			if cost, err := bcrypt.Cost(hash); err != nil || cost != tt.cost {
				t.Errorf("cost = %d, %v; want %d", cost, err, tt.cost)
			}
			if err := bcrypt.CompareHashAndPassword(hash, []byte(tt.password+"x")); err == nil {
				t.Errorf("hash verifies a wrong password")
			}
		})
	}
}

// TestPasswdHashIsAccepted checks that the printed hash is what
// config.Parse wants in password_hash.
func TestPasswdHashIsAccepted(t *testing.T) {
	f := configtest.NewFiles(t)
	code, stdout, stderr := runPasswdTest(t, []string{"-cost", "4"}, "pw\n")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	f.Hash = strings.TrimSpace(stdout)
	cfg := configtest.MustParse(t, f.Config(nil))
	if err := bcrypt.CompareHashAndPassword(cfg.Users[0].PasswordHash, []byte("pw")); err != nil {
		t.Error(err)
	}
}

func TestPasswdFailures(t *testing.T) {
	tests := []struct {
		name  string
		args  []string
		input string
		msg   string
	}{
		{"empty input", nil, "", "empty password"},
		{"empty line", nil, "\nsecond\n", "empty password"},
		{"cost too low", []string{"-cost", "3"}, "pw\n", "-cost"},
		{"cost too high", []string{"-cost", "32"}, "pw\n", "-cost"},
		{"unknown flag", []string{"-x"}, "pw\n", "-x"},
		{"extra argument", []string{"hunter2"}, "pw\n", "unexpected argument"},
		{"too long for bcrypt", []string{"-cost", "4"}, strings.Repeat("a", 73) + "\n", "72"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runPasswdTest(t, tt.args, tt.input)
			if code != 1 {
				t.Errorf("exit %d, want 1", code)
			}
			if stdout != "" {
				t.Errorf("stdout = %q, want nothing", stdout)
			}
			if !strings.Contains(stderr, tt.msg) {
				t.Errorf("stderr = %q, want it to mention %q", stderr, tt.msg)
			}
		})
	}
}

func TestReadPasswordInteractive(t *testing.T) {
	tests := []struct {
		name, input, want, errMsg string
	}{
		{"match", "pw1\npw1\n", "pw1", ""},
		{"mismatch", "pw1\npw2\n", "", "do not match"},
		{"no confirmation", "pw1\n", "", "empty password"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stderr bytes.Buffer
			got, err := readPassword(strings.NewReader(tt.input), true, &stderr)
			if tt.errMsg != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errMsg) {
					t.Errorf("err = %v, want %q", err, tt.errMsg)
				}
				return
			}
			if err != nil || string(got) != tt.want {
				t.Errorf("got %q, %v; want %q", got, err, tt.want)
			}
			if !strings.Contains(stderr.String(), "Password: ") || !strings.Contains(stderr.String(), "Again: ") {
				t.Errorf("prompts = %q", stderr.String())
			}
		})
	}
}

func TestStdinIsTerminal(t *testing.T) {
	if stdinIsTerminal(strings.NewReader("x")) {
		t.Error("a strings.Reader is not a terminal")
	}
	f, err := os.Create(filepath.Join(t.TempDir(), "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if stdinIsTerminal(f) {
		t.Error("a regular file is not a terminal")
	}
}
