package relay

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"

	"smarthost/dkim"
)

// TestSetSignerAndUsers: what a reload swaps in applies to the next
// message and login, on connections already open too.
func TestSetSignerAndUsers(t *testing.T) {
	newSigner := func(selector string) *dkim.Signer {
		_, key, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		s, err := dkim.New([]dkim.Key{{Domain: "example.com", Selector: selector, Signer: key}}, nil)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	env := startServer(t, func(s *Server) { s.Signer = newSigner("old") })
	c := dial(t, env.addrs[0])
	c.login(env.pki)
	if code, msg := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatalf("%d %s", code, msg)
	}
	env.srv.SetSigner(newSigner("new"))
	if code, msg := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatalf("%d %s", code, msg)
	}
	env.srv.SetSigner(nil)
	if code, msg := c.send("app@example.com", []string{"bob@example.net"}, plainMsg); code != 250 {
		t.Fatalf("%d %s", code, msg)
	}
	got := env.q.all()
	if !bytes.Contains(got[0].body, []byte("s=old;")) || !bytes.Contains(got[1].body, []byte("s=new;")) {
		t.Errorf("selectors: first\n%s\nsecond\n%s", got[0].body, got[1].body)
	}
	if bytes.Contains(got[2].body, []byte("DKIM-Signature")) {
		t.Errorf("signed with the signer removed:\n%s", got[2].body)
	}

	hash, err := bcrypt.GenerateFromPassword([]byte("another password"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	env.srv.SetUsers([]User{{Name: "new", PasswordHash: hash, AllowedFrom: []string{"*@example.com"}}})
	// Logged in before as a user the reload removed: its next MAIL is
	// refused, and the connection closed.
	if code, msg := c.cmd("MAIL FROM:<app@example.com>"); code != 421 || !strings.HasPrefix(msg, "4.7.0") {
		t.Errorf("session of a removed user: MAIL %d %s, want 421 4.7.0", code, msg)
	}
	if _, err := c.tp.ReadLine(); err == nil {
		t.Error("connection still open after 421")
	}
	d := dial(t, env.addrs[0])
	d.expect(250, "EHLO client.test")
	d.startTLS(env.pki.ClientTLS())
	d.expect(250, "EHLO client.test")
	if code, _ := d.authPlain("app", testPassword); code != 535 {
		t.Errorf("removed user: AUTH %d, want 535", code)
	}
	if code, _ := d.authPlain("new", "another password"); code != 235 {
		t.Errorf("added user: AUTH %d, want 235", code)
	}
}
