package upstream

import (
	"context"
	"encoding/json"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"smarthost/internal/mailproto"
	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// checkTimeout bounds the checks that should succeed or fail at once; a
// loaded machine stays far below it.
const checkTimeout = 10 * time.Second

// checkServer is a fake upstream that records the commands of a check and
// fails the test if DATA ever arrives.
type checkServer struct {
	*smtptest.Server
	mu    sync.Mutex
	mails []string
	rcpts []string
}

func startCheckServer(t *testing.T, opts smtptest.Options) *checkServer {
	t.Helper()
	s := &checkServer{}
	mail, rcpt := opts.MailReply, opts.RcptReply
	opts.MailReply = func(from string) *smtp.SMTPError {
		s.mu.Lock()
		s.mails = append(s.mails, from)
		s.mu.Unlock()
		if mail != nil {
			return mail(from)
		}
		return nil
	}
	opts.RcptReply = func(to string) *smtp.SMTPError {
		s.mu.Lock()
		s.rcpts = append(s.rcpts, to)
		s.mu.Unlock()
		if rcpt != nil {
			return rcpt(to)
		}
		return nil
	}
	opts.DataReply = func(string, []string, []byte) *smtp.SMTPError {
		t.Error("check-upstream sent DATA")
		return nil
	}
	s.Server = smtptest.Start(t, opts)
	return s
}

func (s *checkServer) commands() (mails, rcpts []string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.mails), slices.Clone(s.rcpts)
}

// stepsOf renders a report's steps as "name:result" for comparison.
func stepsOf(rep CheckReport) []string {
	var out []string
	for _, s := range rep.Steps {
		out = append(out, s.Name+":"+string(s.Result))
	}
	return out
}

func requireSteps(t *testing.T, rep CheckReport, want ...string) {
	t.Helper()
	if got := stepsOf(rep); !slices.Equal(got, want) {
		t.Fatalf("steps %v, want %v\nreport: %+v", got, want, rep)
	}
}

// requireVerdict fails unless rep failed with a problem and fix holding
// the given texts.
func requireVerdict(t *testing.T, rep CheckReport, problem, fix string) {
	t.Helper()
	if rep.Verdict != VerdictFail {
		t.Fatalf("verdict %s, want FAIL; report %+v", rep.Verdict, rep)
	}
	if !strings.Contains(rep.Problem, problem) {
		t.Errorf("problem %q, want it to contain %q", rep.Problem, problem)
	}
	if !strings.Contains(rep.Fix, fix) {
		t.Errorf("fix %q, want it to contain %q", rep.Fix, fix)
	}
}

func stepDetail(rep CheckReport, name string) string {
	for _, s := range rep.Steps {
		if s.Name == name {
			return s.Detail
		}
	}
	return ""
}

func TestCheckUpstreamImplicitTLSOK(t *testing.T) {
	pki := testpki.New(t)
	srv := startCheckServer(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(),
		Username: upUser, Password: upPass})
	up := Upstream{Name: "good", Address: srv.Addr(), TLS: mailproto.TLSImplicit, Username: upUser, Password: upPass, RootCAs: pki.CAPool}

	rep := Check(context.Background(), up, CheckOptions{Hostname: "relay.test", Timeout: checkTimeout,
		Recipient: "someone@example.net"})
	requireSteps(t, rep, "connect:ok", "tls:ok", "ehlo:ok", "auth:ok", "mail:ok", "rcpt:ok", "rset:ok")
	if rep.Verdict != VerdictOK || rep.Problem != "" || rep.Fix != "" {
		t.Errorf("verdict %s %q %q, want OK", rep.Verdict, rep.Problem, rep.Fix)
	}
	if rep.TLS == nil || !rep.TLS.Verified || rep.TLS.Version != "TLS 1.3" || len(rep.TLS.Chain) != 1 ||
		rep.TLS.Chain[0].Subject != "localhost" || rep.TLS.Chain[0].Issuer != "smarthost test CA" {
		t.Errorf("TLS %+v", rep.TLS)
	}
	if !slices.Contains(rep.Extensions, "AUTH PLAIN LOGIN") {
		t.Errorf("extensions %v lack AUTH PLAIN LOGIN", rep.Extensions)
	}
	if rep.AuthMechanism != sasl.Plain || rep.Sender != upUser || rep.Recipient != "someone@example.net" {
		t.Errorf("auth %q, sender %q, recipient %q", rep.AuthMechanism, rep.Sender, rep.Recipient)
	}
	if d := stepDetail(rep, StepAuth); d != "PLAIN as relay@example.com: accepted (235)" {
		t.Errorf("auth detail %q", d)
	}
	mails, rcpts := srv.commands()
	if !slices.Equal(mails, []string{upUser}) || !slices.Equal(rcpts, []string{"someone@example.net"}) {
		t.Errorf("server saw MAIL %v, RCPT %v", mails, rcpts)
	}
	if got := srv.AuthAttempts(); !slices.Equal(got, []string{upUser}) {
		t.Errorf("AUTH attempts %v", got)
	}
	if n := len(srv.Messages()); n != 0 {
		t.Errorf("%d messages delivered by a check", n)
	}
}

func TestCheckUpstreamStartTLSOK(t *testing.T) {
	pki := testpki.New(t)
	srv := startCheckServer(t, smtptest.Options{TLS: smtptest.TLSStartTLS, TLSConfig: pki.ServerTLS(),
		Username: upUser, Password: upPass})
	up := Upstream{Name: "587", Address: srv.Addr(), TLS: mailproto.TLSStartTLS, Username: upUser, Password: upPass, RootCAs: pki.CAPool}

	rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout})
	requireSteps(t, rep, "connect:ok", "starttls:ok", "tls:ok", "ehlo:ok", "auth:ok", "mail:ok", "rcpt:skipped", "rset:ok")
	if rep.Verdict != VerdictOK {
		t.Errorf("verdict %s: %s", rep.Verdict, rep.Problem)
	}
	if rep.TLS == nil || !rep.TLS.Verified {
		t.Errorf("TLS %+v, want verified", rep.TLS)
	}
	// The extensions are those offered after TLS, where AUTH appears.
	if !slices.Contains(rep.Extensions, "AUTH PLAIN LOGIN") || slices.Contains(rep.Extensions, "STARTTLS") {
		t.Errorf("extensions %v", rep.Extensions)
	}
}

func TestCheckImplicitAgainstPlainSMTP(t *testing.T) {
	pki := testpki.New(t)
	srv := startCheckServer(t, smtptest.Options{TLS: smtptest.TLSStartTLS, TLSConfig: pki.ServerTLS()})
	up := Upstream{Name: "wrong", Address: srv.Addr(), TLS: mailproto.TLSImplicit, RootCAs: pki.CAPool}
	_, port, _ := net.SplitHostPort(srv.Addr())

	rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout})
	requireSteps(t, rep, "connect:ok", "tls:failed")
	requireVerdict(t, rep, "port "+port+" speaks plain SMTP", `use tls = "starttls" (usually port 587)`)
	if d := stepDetail(rep, StepTLS); !strings.Contains(d, `"220 smtptest.localhost`) {
		t.Errorf("tls detail %q does not quote the greeting", d)
	}
}

func TestCheckPlainAgainstImplicitTLS(t *testing.T) {
	t.Parallel() // it waits out timeouts
	for _, mode := range []mailproto.TLSMode{mailproto.TLSStartTLS, mailproto.TLSNone} {
		t.Run(string(mode), func(t *testing.T) {
			t.Parallel() // each waits out its timeout
			pki := testpki.New(t)
			srv := startCheckServer(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS()})
			up := Upstream{Name: "wrong", Address: srv.Addr(), TLS: mode, RootCAs: pki.CAPool}
			_, port, _ := net.SplitHostPort(srv.Addr())

			// The greeting never comes: the check waits out its timeout.
			start := time.Now()
			rep := Check(context.Background(), up, CheckOptions{Timeout: 2 * time.Second})
			if took := time.Since(start); took > 8*time.Second {
				t.Errorf("check took %v", took)
			}
			first := StepEHLO
			if mode == mailproto.TLSStartTLS {
				first = StepStartTLS
			}
			requireSteps(t, rep, "connect:ok", first+":failed")
			requireVerdict(t, rep, "port "+port+" speaks TLS at once", `use tls = "implicit" (usually port 465)`)
		})
	}
}

func TestCheckNoGreeting(t *testing.T) {
	t.Parallel() // it waits out timeouts
	tests := []struct {
		name    string
		closeAt bool // close at once rather than wait for the client
		problem string
	}{
		{"silent", false, "no SMTP greeting within 1s from "},
		{"closing", true, "no SMTP greeting before the connection ended from "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// Neither an SMTP nor a TLS server.
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			var conns sync.WaitGroup
			t.Cleanup(conns.Wait)
			t.Cleanup(func() { _ = ln.Close() })
			go func() {
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					conns.Go(func() {
						if !tt.closeAt {
							_, _ = c.Read(make([]byte, 1024)) // until the client gives up
						}
						_ = c.Close()
					})
				}
			}()
			up := Upstream{Name: "silent", Address: ln.Addr().String(), TLS: mailproto.TLSStartTLS}
			rep := Check(context.Background(), up, CheckOptions{Timeout: time.Second})
			requireSteps(t, rep, "connect:ok", "starttls:failed")
			requireVerdict(t, rep, tt.problem+up.Address, "firewall")
		})
	}
}

func TestCheckStartTLSNotOffered(t *testing.T) {
	srv := startCheckServer(t, smtptest.Options{})
	up := Upstream{Name: "plain", Address: srv.Addr(), TLS: mailproto.TLSStartTLS}
	rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout})
	requireSteps(t, rep, "connect:ok", "starttls:failed")
	requireVerdict(t, rep, "does not offer STARTTLS", `587 with tls = "starttls"`)
}

func TestCheckUntrustedCertificate(t *testing.T) {
	for _, mode := range []mailproto.TLSMode{mailproto.TLSImplicit, mailproto.TLSStartTLS} {
		t.Run(string(mode), func(t *testing.T) {
			pki := testpki.New(t)
			other := testpki.New(t) // trusted instead of the server's CA
			srv := startCheckServer(t, smtptest.Options{TLS: smtptest.TLSMode(mode), TLSConfig: pki.ServerTLS()})
			up := Upstream{Name: "private", Address: srv.Addr(), TLS: mode, RootCAs: other.CAPool}

			rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout})
			requireSteps(t, rep, "connect:ok", "tls:failed")
			requireVerdict(t, rep, `issued by "smarthost test CA", which this host does not trust`, `ca_file = "/path/to/ca.pem"`)
			if rep.TLS == nil || rep.TLS.Verified || len(rep.TLS.Chain) == 0 || rep.TLS.Chain[0].Issuer != "smarthost test CA" {
				t.Errorf("TLS %+v", rep.TLS)
			}
			if d := stepDetail(rep, StepTLS); !strings.Contains(d, `"localhost" issued by "smarthost test CA"`) {
				t.Errorf("tls detail %q", d)
			}
		})
	}
}

func TestCheckCertificateNameMismatch(t *testing.T) {
	pki := testpki.New(t)
	srv := startCheckServer(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS()})
	// The configured name is not the certificate's; the dialer still
	// reaches the loopback server.
	up := Upstream{Name: "renamed", Address: "mail.example.test:465", TLS: mailproto.TLSImplicit, RootCAs: pki.CAPool}
	dial := func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, srv.Addr())
	}
	rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout, Dial: dial})
	requireSteps(t, rep, "connect:ok", "tls:failed")
	requireVerdict(t, rep, "the certificate is for localhost, not mail.example.test", `"localhost:465"`)
}

func TestCheckConnectionRefused(t *testing.T) {
	// A port that was just free: nothing listens there.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	_, port, _ := net.SplitHostPort(addr)

	rep := Check(context.Background(), Upstream{Name: "down", Address: addr, TLS: mailproto.TLSImplicit},
		CheckOptions{Timeout: checkTimeout})
	requireSteps(t, rep, "connect:failed")
	requireVerdict(t, rep, "refused: nothing listens on port "+port, "check address and port")
	if d := stepDetail(rep, StepConnect); d != "connection refused" {
		t.Errorf("connect detail %q", d)
	}
}

func TestCheckConnectTimeout(t *testing.T) {
	t.Parallel() // it waits out timeouts
	// A dialer that never connects, as when a firewall drops the packets.
	dial := func(ctx context.Context, _, _ string) (net.Conn, error) {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	up := Upstream{Name: "blocked", Address: "127.0.0.1:465", TLS: mailproto.TLSImplicit}
	rep := Check(context.Background(), up, CheckOptions{Timeout: time.Second, Dial: dial})
	requireSteps(t, rep, "connect:failed")
	requireVerdict(t, rep, "no answer from 127.0.0.1:465 within 1s", "firewall")
}

func TestCheckGreetingRefused(t *testing.T) {
	srv := startCheckServer(t, smtptest.Options{GreetReply: &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
		Message: "Client host rejected: listed at a blocklist"}})
	rep := Check(context.Background(), Upstream{Name: "blocked", Address: srv.Addr(), TLS: mailproto.TLSNone},
		CheckOptions{Timeout: checkTimeout})
	requireSteps(t, rep, "connect:ok", "ehlo:failed")
	requireVerdict(t, rep, "refused the session: 554 5.7.1 Client host rejected", "IP address")
}

func TestCheckPasswordRefused(t *testing.T) {
	pki := testpki.New(t)
	srv := startCheckServer(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(),
		Username: upUser, Password: upPass})
	up := Upstream{Name: "gmail", Address: srv.Addr(), TLS: mailproto.TLSImplicit, Username: upUser, Password: "account-password",
		RootCAs: pki.CAPool}

	tests := []struct {
		provider, fix string
	}{
		{"", "Gmail, Yahoo, Yandex and Mail.ru need an app password when 2-step verification is on; check username"},
		{"gmail", "Gmail needs an app password (Google Account > Security"},
		{"yandex", "id.yandex.ru"},
		{"outlook365", `auth = "xoauth2"`},
	}
	for _, tt := range tests {
		t.Run("provider="+tt.provider, func(t *testing.T) {
			rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout, Provider: tt.provider})
			requireSteps(t, rep, "connect:ok", "tls:ok", "ehlo:ok", "auth:failed")
			requireVerdict(t, rep, "password refused: 535 5.7.8", tt.fix)
			// Neither password appears anywhere in the report.
			data, err := json.Marshal(rep)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(data), "account-password") || strings.Contains(string(data), upPass) {
				t.Errorf("the report shows a password: %s", data)
			}
		})
	}
}

func TestCheckAuthNotOffered(t *testing.T) {
	pki := testpki.New(t)
	tests := []struct {
		name string
		opts smtptest.Options
		mode mailproto.TLSMode
		want string
		fix  string
	}{
		{"plain text", smtptest.Options{}, mailproto.TLSNone, "offers no AUTH over plain text", `tls = "starttls"`},
		{"port 25", smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS()}, mailproto.TLSImplicit,
			"offers no AUTH on port", "submission port"},
		{"other mechanisms", smtptest.Options{Username: upUser, Password: upPass, AuthMechanisms: []string{"CRAM-MD5"}}, mailproto.TLSNone,
			"offers AUTH CRAM-MD5, none of which this login can use", "PLAIN or LOGIN"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := startCheckServer(t, tt.opts)
			up := Upstream{Name: "x", Address: srv.Addr(), TLS: tt.mode, Username: upUser, Password: upPass, RootCAs: pki.CAPool}
			rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout})
			requireSteps(t, rep, "connect:ok", "tls:"+map[bool]string{true: "skipped", false: "ok"}[tt.mode == mailproto.TLSNone], "ehlo:ok", "auth:failed")
			requireVerdict(t, rep, tt.want, tt.fix)
		})
	}
}

func TestCheckSenderRefused(t *testing.T) {
	pki := testpki.New(t)
	srv := startCheckServer(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(),
		Username: upUser, Password: upPass,
		MailReply: func(from string) *smtp.SMTPError {
			if from != upUser {
				return &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 7, 1},
					Message: "Sender address rejected: not owned by auth user"}
			}
			return nil
		}})
	up := Upstream{Name: "yandex", Address: srv.Addr(), TLS: mailproto.TLSImplicit, Username: upUser, Password: upPass, RootCAs: pki.CAPool}

	rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout, Sender: "app@example.com",
		Recipient: "someone@example.net"})
	// RCPT is not tried after a refused MAIL; RSET still ends the
	// transaction.
	requireSteps(t, rep, "connect:ok", "tls:ok", "ehlo:ok", "auth:ok", "mail:failed", "rset:ok")
	requireVerdict(t, rep, "the upstream does not let relay@example.com send as <app@example.com>: 553 5.7.1 Sender address rejected",
		`set envelope_from = "relay@example.com" (and dsn_from)`)

	// The login's own address, which envelope_from would send, passes.
	up.EnvelopeFrom = upUser
	rep = Check(context.Background(), up, CheckOptions{Timeout: checkTimeout})
	if rep.Verdict != VerdictOK || rep.Sender != upUser {
		t.Errorf("with envelope_from: verdict %s (%s), sender %q", rep.Verdict, rep.Problem, rep.Sender)
	}
}

func TestCheckRecipientRefused(t *testing.T) {
	tests := []struct {
		name  string
		reply *smtp.SMTPError
		want  string
	}{
		{"unknown", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"},
			"refuses the recipient <nobody@example.net>: 550 5.1.1 No such user"},
		{"relay denied", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Relay access denied"},
			"refuses to relay to <nobody@example.net>"},
		{"deferred", &smtp.SMTPError{Code: 450, EnhancedCode: smtp.EnhancedCode{4, 2, 0}, Message: "Mailbox busy"},
			"deferred RCPT TO <nobody@example.net>"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := startCheckServer(t, smtptest.Options{Username: upUser, Password: upPass,
				RcptReply: func(string) *smtp.SMTPError { return tt.reply }})
			up := Upstream{Name: "x", Address: srv.Addr(), TLS: mailproto.TLSNone, Username: upUser, Password: upPass}
			rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout, Recipient: "nobody@example.net"})
			requireSteps(t, rep, "connect:ok", "tls:skipped", "ehlo:ok", "auth:ok", "mail:ok", "rcpt:failed", "rset:ok")
			requireVerdict(t, rep, tt.want, "")
		})
	}
}

func TestCheckAuthRequired(t *testing.T) {
	srv := startCheckServer(t, smtptest.Options{Username: upUser, Password: upPass})
	up := Upstream{Name: "noauth", Address: srv.Addr(), TLS: mailproto.TLSNone}
	rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout, Sender: "app@example.com"})
	requireSteps(t, rep, "connect:ok", "tls:skipped", "ehlo:ok", "auth:skipped", "mail:failed", "rset:ok")
	requireVerdict(t, rep, "requires authentication: 530", "set username, and password_env or password_file")
}

func TestCheckSender(t *testing.T) {
	tests := []struct {
		name string
		up   Upstream
		opt  string
		want string // "" means MAIL is skipped
	}{
		{"option first", Upstream{EnvelopeFrom: "env@example.com", Username: upUser}, "opt@example.com", "opt@example.com"},
		{"envelope_from", Upstream{EnvelopeFrom: "env@example.com", Username: upUser}, "", "env@example.com"},
		{"login address", Upstream{Username: upUser}, "", upUser},
		{"login not an address", Upstream{Username: "AKIAEXAMPLE"}, "", ""},
		{"no login", Upstream{}, "", ""},
	}
	for _, tt := range tests {
		ck := &checker{up: &tt.up, opts: CheckOptions{Sender: tt.opt}}
		if got, why := ck.sender(); got != tt.want || (got == "") == (why == "") {
			t.Errorf("%s: sender %q (%q), want %q", tt.name, got, why, tt.want)
		}
	}
}

func TestCheckWithoutSender(t *testing.T) {
	srv := startCheckServer(t, smtptest.Options{})
	up := Upstream{Name: "x", Address: srv.Addr(), TLS: mailproto.TLSNone}
	rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout, Recipient: "someone@example.net"})
	requireSteps(t, rep, "connect:ok", "tls:skipped", "ehlo:ok", "auth:skipped", "mail:skipped")
	if rep.Verdict != VerdictOK {
		t.Errorf("verdict %s: %s", rep.Verdict, rep.Problem)
	}
	if mails, rcpts := srv.commands(); len(mails)+len(rcpts) != 0 {
		t.Errorf("server saw MAIL %v, RCPT %v", mails, rcpts)
	}
}

func TestCheckOAuth2(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	ts := startTokenServer(t, clock)
	srv := startOAuthUpstream(t, ts, xoauth2Mech)
	cfg := refreshFlow()
	cfg.TokenURL, cfg.Client = ts.URL(), ts.srv.Client()
	up := Upstream{Name: "oauth", Address: srv.Addr(), TLS: mailproto.TLSNone, Username: upUser, Auth: AuthXOAUTH2, OAuth: &cfg}

	rep := Check(context.Background(), up, CheckOptions{Timeout: checkTimeout})
	requireSteps(t, rep, "connect:ok", "tls:skipped", "ehlo:ok", "auth:ok", "mail:ok", "rcpt:skipped", "rset:ok")
	if rep.AuthMechanism != xoauth2Mech || rep.Verdict != VerdictOK {
		t.Errorf("mechanism %q, verdict %s: %s", rep.AuthMechanism, rep.Verdict, rep.Problem)
	}
	if got := ts.requests(); !slices.Equal(got, []string{"refresh_token"}) {
		t.Errorf("token requests %v", got)
	}

	// A revoked refresh token: the token endpoint refuses the grant.
	bad := cfg
	bad.RefreshToken = "1//revoked"
	up.OAuth = &bad
	rep = Check(context.Background(), up, CheckOptions{Timeout: checkTimeout})
	requireSteps(t, rep, "connect:ok", "tls:skipped", "ehlo:ok", "auth:failed")
	requireVerdict(t, rep, "token endpoint refused the grant: oauth2 token request refused: invalid_grant", "renew the refresh token")

	// A token the upstream refuses.
	up.OAuth = &cfg
	srv.setRejectAll(true)
	rep = Check(context.Background(), up, CheckOptions{Timeout: checkTimeout})
	requireVerdict(t, rep, "refused the OAuth2 access token for relay@example.com: 535 5.7.8", "scope")

	data, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	for _, secret := range append([]string{oauthClientSecret, oauthRefreshToken}, ts.tokens()...) {
		if strings.Contains(string(data), secret) {
			t.Errorf("the report shows secret %q: %s", secret, data)
		}
	}
}

func TestProviderFor(t *testing.T) {
	tests := []struct {
		name, address, want string
	}{
		{"", "smtp.gmail.com:465", "gmail"},
		{"", "SMTP.Yandex.ru:587", "yandex"},
		{"", "email-smtp.eu-west-1.amazonaws.com:587", "ses"},
		{"", "email-smtp..amazonaws.com:587", ""},
		{"", "mail.example.com:587", ""},
		{"mailgun", "smtp.eu.mailgun.org:587", "mailgun"},
	}
	for _, tt := range tests {
		p, ok := providerFor(tt.name, tt.address)
		if ok != (tt.want != "") || p.Name != tt.want {
			t.Errorf("providerFor(%q, %q) = %q, %v; want %q", tt.name, tt.address, p.Name, ok, tt.want)
		}
	}
}

func TestCheckCancelled(t *testing.T) {
	pki := testpki.New(t)
	srv := startCheckServer(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS()})
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	rep := Check(ctx, Upstream{Name: "x", Address: srv.Addr(), TLS: mailproto.TLSImplicit, RootCAs: pki.CAPool},
		CheckOptions{Timeout: checkTimeout})
	if rep.Verdict != VerdictFail || len(rep.Steps) != 1 || rep.Steps[0].Name != StepConnect {
		t.Errorf("cancelled check: %+v", rep)
	}
}
