package smtptest

import (
	"crypto/tls"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"smarthost/internal/testpki"
)

const body = "From: a@example.com\r\nSubject: hi\r\n\r\nline one\r\n.dot line\r\n.\r\nend\r\n"

func dial(t *testing.T, s *Server, mode TLSMode, cfg *tls.Config) *smtp.Client {
	t.Helper()
	var (
		c   *smtp.Client
		err error
	)
	switch mode {
	case TLSImplicit:
		c, err = smtp.DialTLS(s.Addr(), cfg)
	case TLSStartTLS:
		c, err = smtp.DialStartTLS(s.Addr(), cfg)
	default:
		c, err = smtp.Dial(s.Addr())
	}
	if err != nil {
		t.Fatalf("dial %s: %v", s.Addr(), err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

func send(c *smtp.Client, from string, to []string, data string) error {
	if err := c.SendMail(from, to, strings.NewReader(data)); err != nil {
		return err
	}
	return nil
}

func code(err error) int {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

func TestRecordsMessagePlainAuth(t *testing.T) {
	s := Start(t, Options{Username: "relay", Password: "secret"})
	c := dial(t, s, TLSNone, nil)
	if err := c.Mail("a@example.com", nil); code(err) != 530 {
		t.Fatalf("MAIL before AUTH: %v, want 530", err)
	}
	if err := c.Auth(sasl.NewPlainClient("", "relay", "wrong")); code(err) != 535 {
		t.Fatalf("AUTH with a wrong password: %v, want 535", err)
	}
	c2 := dial(t, s, TLSNone, nil)
	if err := c2.Auth(sasl.NewPlainClient("", "relay", "secret")); err != nil {
		t.Fatal(err)
	}
	if err := send(c2, "a@example.com", []string{"x@example.net", "y@example.net"}, body); err != nil {
		t.Fatal(err)
	}
	if err := c2.Quit(); err != nil {
		t.Fatal(err)
	}
	msgs := s.WaitMessages(t, 1, 5*time.Second)
	m := msgs[0]
	if m.From != "a@example.com" || strings.Join(m.To, ",") != "x@example.net,y@example.net" {
		t.Errorf("envelope %q -> %q", m.From, m.To)
	}
	if string(m.Data) != body {
		t.Errorf("data %q, want %q", m.Data, body)
	}
	if m.AuthUser != "relay" || m.TLS || m.ConnID != 2 {
		t.Errorf("AuthUser %q TLS %v ConnID %d, want relay false 2", m.AuthUser, m.TLS, m.ConnID)
	}
	if got := strings.Join(s.AuthAttempts(), ","); got != "relay,relay" {
		t.Errorf("AuthAttempts %q", got)
	}
	if s.Connections() != 2 {
		t.Errorf("Connections %d, want 2", s.Connections())
	}
}

func TestImplicitTLSLogin(t *testing.T) {
	pki := testpki.New(t)
	s := Start(t, Options{TLS: TLSImplicit, TLSConfig: pki.ServerTLS(), Username: "u", Password: "p"})
	c := dial(t, s, TLSImplicit, pki.ClientTLS())
	if ok, mechs := c.Extension("AUTH"); !ok || !strings.Contains(mechs, "LOGIN") {
		t.Fatalf("AUTH extension %v %q", ok, mechs)
	}
	if err := c.Auth(sasl.NewLoginClient("u", "p")); err != nil {
		t.Fatal(err)
	}
	if err := send(c, "", []string{"x@example.net"}, body); err != nil {
		t.Fatal(err)
	}
	m := s.WaitMessages(t, 1, 5*time.Second)[0]
	if !m.TLS || m.AuthUser != "u" || m.From != "" {
		t.Errorf("TLS %v AuthUser %q From %q", m.TLS, m.AuthUser, m.From)
	}
}

func TestAuthMechanisms(t *testing.T) {
	s := Start(t, Options{Username: "u", Password: "p", AuthMechanisms: []string{"LOGIN"}})
	c := dial(t, s, TLSNone, nil)
	if c.SupportsAuth("PLAIN") || !c.SupportsAuth("LOGIN") {
		t.Error("want only LOGIN offered")
	}
	if err := c.Auth(sasl.NewPlainClient("", "u", "p")); code(err) != 504 {
		t.Errorf("AUTH PLAIN: %v, want 504", err)
	}
	if err := c.Auth(sasl.NewLoginClient("u", "p")); err != nil {
		t.Errorf("AUTH LOGIN: %v", err)
	}
}

func TestStartTLSWithholdsAuth(t *testing.T) {
	pki := testpki.New(t)
	s := Start(t, Options{TLS: TLSStartTLS, TLSConfig: pki.ServerTLS(), Username: "u", Password: "p"})

	plain := dial(t, s, TLSNone, nil)
	if ok, _ := plain.Extension("STARTTLS"); !ok {
		t.Error("STARTTLS not offered")
	}
	if ok, _ := plain.Extension("AUTH"); ok {
		t.Error("AUTH offered before TLS")
	}

	c := dial(t, s, TLSStartTLS, pki.ClientTLS())
	if err := c.Auth(sasl.NewPlainClient("", "u", "p")); err != nil {
		t.Fatal(err)
	}
	if err := send(c, "a@example.com", []string{"x@example.net"}, body); err != nil {
		t.Fatal(err)
	}
	if m := s.WaitMessages(t, 1, 5*time.Second)[0]; !m.TLS || m.AuthUser != "u" {
		t.Errorf("TLS %v AuthUser %q", m.TLS, m.AuthUser)
	}
}

func TestReplyHooks(t *testing.T) {
	s := Start(t, Options{
		RcptReply: func(to string) *smtp.SMTPError {
			if to == "bad@example.net" {
				return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
			}
			return nil
		},
	})
	c := dial(t, s, TLSNone, nil)
	if err := c.Mail("a@example.com", nil); err != nil {
		t.Fatal(err)
	}
	err := c.Rcpt("bad@example.net", nil)
	var se *smtp.SMTPError
	if !errors.As(err, &se) || se.Code != 550 || se.EnhancedCode != (smtp.EnhancedCode{5, 1, 1}) || se.Message != "No such user" {
		t.Fatalf("RCPT bad: %v", err)
	}
	if err := c.Rcpt("good@example.net", nil); err != nil {
		t.Fatal(err)
	}

	s.SetDataReply(func(from string, to []string, data []byte) *smtp.SMTPError {
		if from != "a@example.com" || len(to) != 1 || string(data) != body {
			t.Errorf("DataReply got %q %q %q", from, to, data)
		}
		return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Rejected"}
	})
	w, err := c.Data()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Write([]byte(body)); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); code(err) != 554 {
		t.Fatalf("end of data: %v, want 554", err)
	}

	s.SetDataReply(nil)
	s.SetMailReply(func(string) *smtp.SMTPError {
		return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Try later"}
	})
	if err := c.Mail("a@example.com", nil); code(err) != 451 {
		t.Fatalf("MAIL: %v, want 451", err)
	}
	if n := len(s.Messages()); n != 0 {
		t.Errorf("%d messages recorded, want 0", n)
	}
}

func TestGreetReply(t *testing.T) {
	pki := testpki.New(t)
	for _, mode := range []TLSMode{TLSNone, TLSImplicit} {
		t.Run(string(mode), func(t *testing.T) {
			s := Start(t, Options{TLS: mode, TLSConfig: pki.ServerTLS(),
				GreetReply: &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Busy"}})
			c := dial(t, s, mode, pki.ClientTLS())
			if err := c.Hello("client.example"); code(err) != 421 {
				t.Fatalf("greeting: %v, want 421", err)
			}
			s.SetGreetReply(nil)
			c = dial(t, s, mode, pki.ClientTLS())
			if err := c.Hello("client.example"); err != nil {
				t.Fatal(err)
			}
			if s.Connections() != 2 {
				t.Errorf("Connections %d, want 2", s.Connections())
			}
		})
	}
}

func TestDrop(t *testing.T) {
	s := Start(t, Options{DataReply: func(string, []string, []byte) *smtp.SMTPError { return Drop }})
	c := dial(t, s, TLSNone, nil)
	err := send(c, "a@example.com", []string{"x@example.net"}, body)
	if err == nil || code(err) != 0 {
		t.Fatalf("send: %v, want a connection error", err)
	}
	if n := len(s.Messages()); n != 0 {
		t.Errorf("%d messages recorded, want 0", n)
	}
}

func TestCloseAndRestart(t *testing.T) {
	s := Start(t, Options{})
	addr := s.Addr()
	idle := dial(t, s, TLSNone, nil)
	if err := idle.Hello("client.example"); err != nil {
		t.Fatal(err)
	}
	s.Close()
	if err := idle.Noop(); err == nil {
		t.Error("connection still open after Close")
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Fatal("still listening after Close")
	}
	s2 := Start(t, Options{Addr: addr})
	if s2.Addr() != addr {
		t.Fatalf("restarted on %s, want %s", s2.Addr(), addr)
	}
	c := dial(t, s2, TLSNone, nil)
	if err := send(c, "a@example.com", []string{"x@example.net"}, body); err != nil {
		t.Fatal(err)
	}
	s2.WaitMessages(t, 1, 5*time.Second)
}

func TestMaxConcurrent(t *testing.T) {
	s := Start(t, Options{})
	// One after another, each waiting for the reply to QUIT: never two.
	for range 5 {
		c := dial(t, s, TLSNone, nil)
		if err := send(c, "a@example.com", []string{"x@example.net"}, body); err != nil {
			t.Fatal(err)
		}
		if err := c.Quit(); err != nil {
			t.Fatal(err)
		}
	}
	if n := s.MaxConcurrent(); n != 1 {
		t.Errorf("MaxConcurrent after sequential sessions %d, want 1", n)
	}
	// Three held open at once, even when idle.
	for range 3 {
		c := dial(t, s, TLSNone, nil)
		if err := c.Hello("client.example"); err != nil {
			t.Fatal(err)
		}
	}
	if n := s.MaxConcurrent(); n != 3 {
		t.Errorf("MaxConcurrent with three open %d, want 3", n)
	}
	if n := s.Connections(); n != 8 {
		t.Errorf("Connections %d, want 8", n)
	}
}

// TestAuthServer: a test's own mechanism, here go-sasl's OAUTHBEARER
// server, replaces PLAIN and LOGIN and is required before MAIL.
func TestAuthServer(t *testing.T) {
	s := Start(t, Options{
		AuthMechanisms: []string{sasl.OAuthBearer},
		AuthServer: func(mech string, authenticated func(string)) sasl.Server {
			return sasl.NewOAuthBearerServer(func(o sasl.OAuthBearerOptions) *sasl.OAuthBearerError {
				if o.Token != "good" {
					return &sasl.OAuthBearerError{Status: "invalid_token"}
				}
				authenticated(o.Username)
				return nil
			})
		},
	})
	c := dial(t, s, TLSNone, nil)
	if c.SupportsAuth(sasl.Plain) || !c.SupportsAuth(sasl.OAuthBearer) {
		t.Error("want only OAUTHBEARER offered")
	}
	if err := c.Mail("a@example.com", nil); code(err) != 530 {
		t.Fatalf("MAIL before AUTH: %v, want 530", err)
	}
	var be *sasl.OAuthBearerError
	if err := c.Auth(sasl.NewOAuthBearerClient(&sasl.OAuthBearerOptions{Username: "u", Token: "bad"})); !errors.As(err, &be) {
		t.Fatalf("AUTH with a bad token: %v, want the OAUTHBEARER error", err)
	}
	if err := c.Auth(sasl.NewOAuthBearerClient(&sasl.OAuthBearerOptions{Username: "u", Token: "good"})); err != nil {
		t.Fatal(err)
	}
	if err := send(c, "a@example.com", []string{"x@example.net"}, body); err != nil {
		t.Fatal(err)
	}
	if m := s.WaitMessages(t, 1, 5*time.Second)[0]; m.AuthUser != "u" {
		t.Errorf("AuthUser %q, want u", m.AuthUser)
	}
}
