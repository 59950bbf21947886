package upstream

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"time"

	"smarthost/internal/mailproto"

	"github.com/emersion/go-smtp"
)

// CheckOptions configure Check.
type CheckOptions struct {
	// Hostname is the EHLO name; default "localhost".
	Hostname string
	// Timeout bounds connecting, TLS and the greeting together, and then
	// each reply; default 15s.
	Timeout time.Duration
	// Sender is the MAIL FROM address to try. "" takes the upstream's
	// EnvelopeFrom, else its Username when that is an address, else MAIL
	// FROM is skipped.
	Sender string
	// Recipient is the RCPT TO address to try after MAIL FROM; "" skips
	// RCPT TO. No message is sent either way.
	Recipient string
	// Provider names the profile the upstream was configured from
	// ("gmail", …), for provider-specific hints; "" recognises a profile
	// by the host of the upstream's address.
	Provider string
	// Dial opens connections; default (&net.Dialer{}).DialContext.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Logger receives the OAuth2 token requests' logs; default: discarded.
	Logger *slog.Logger
}

// StepResult is how one step of a check ended.
type StepResult string

// Step results.
const (
	StepOK      StepResult = "ok"
	StepFailed  StepResult = "failed"
	StepSkipped StepResult = "skipped"
)

// Names of the steps of a check, in the order they run.
const (
	StepConnect  = "connect"
	StepStartTLS = "starttls" // the plain-text part of a STARTTLS session
	StepTLS      = "tls"
	StepEHLO     = "ehlo"
	StepAuth     = "auth"
	StepMail     = "mail"
	StepRcpt     = "rcpt"
	StepRset     = "rset"
)

// CheckStep is one step of a check.
type CheckStep struct {
	Name   string     `json:"name"` // one of the Step* names
	Result StepResult `json:"result"`
	// Detail says what happened: the peer's address, the TLS session, the
	// extensions, the upstream's reply, or why the step was skipped. It
	// never holds a secret.
	Detail string `json:"detail"`
}

// Verdict sums a check up.
type Verdict string

// Verdicts.
const (
	VerdictOK   Verdict = "OK"
	VerdictFail Verdict = "FAIL"
)

// CheckReport is what Check found out about one upstream.
type CheckReport struct {
	Upstream string            `json:"upstream"`
	Address  string            `json:"address"`
	TLSMode  mailproto.TLSMode `json:"tls_mode"`
	Steps    []CheckStep       `json:"steps"`
	// TLS is the negotiated session, or the certificate chain that failed
	// verification; nil without TLS or when no certificate was seen.
	TLS *TLSReport `json:"tls,omitempty"`
	// Extensions are the EHLO extensions the upstream offers (after TLS),
	// with their parameters, among those of the IANA registry that
	// matter to a submission client.
	Extensions    []string `json:"extensions,omitempty"`
	AuthMechanism string   `json:"auth_mechanism,omitempty"`
	Sender        string   `json:"sender,omitempty"`    // MAIL FROM tried, if any
	Recipient     string   `json:"recipient,omitempty"` // RCPT TO tried, if any
	Verdict       Verdict  `json:"verdict"`
	// Problem is what failed, on one line; "" when the verdict is OK.
	Problem string `json:"problem,omitempty"`
	// Fix is the usual cure for Problem, often a configuration change;
	// "" when there is none to suggest.
	Fix string `json:"fix,omitempty"`
}

// TLSReport describes an upstream's TLS session.
type TLSReport struct {
	Version     string `json:"version,omitempty"` // "TLS 1.3"; "" when the handshake failed
	CipherSuite string `json:"cipher_suite,omitempty"`
	Verified    bool   `json:"verified"`
	// VerifyError is why the certificate was not trusted.
	VerifyError string `json:"verify_error,omitempty"`
	// Chain is what the upstream presented, its own certificate first.
	Chain []CertSummary `json:"chain"`
}

// CertSummary names one certificate of a chain.
type CertSummary struct {
	Subject  string    `json:"subject"`
	Issuer   string    `json:"issuer"`
	DNSNames []string  `json:"dns_names,omitempty"`
	NotAfter time.Time `json:"not_after"`
}

// Check connects to up as a delivery would, through the
// Deliverer's own dial, TLS, EHLO and AUTH code, and reports each step: the
// TLS session and its certificate, the EHLO extensions, the login, and
// the replies to MAIL FROM and RCPT TO for test addresses, ended by RSET.
// It never sends DATA. The verdict names the first problem found and, for
// the usual mistakes, how to fix it.
func Check(ctx context.Context, up Upstream, opts CheckOptions) CheckReport {
	if opts.Timeout <= 0 {
		opts.Timeout = 15 * time.Second
	}
	logger := opts.Logger
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	d := NewDeliverer()
	d.Logger = logger
	if opts.Hostname != "" {
		d.Hostname = opts.Hostname
	}
	if opts.Dial != nil {
		d.Dial = opts.Dial
	}
	d.SetConfig(Config{CommandTimeout: opts.Timeout})
	ck := &checker{
		d:      d,
		up:     &up,
		tokens: newTokenCache(&up, d.clock, d.log),
		opts:   opts,
		rep:    CheckReport{Upstream: up.Name, Address: up.Address, TLSMode: up.TLS, Verdict: VerdictOK},
	}
	ck.port = up.Address
	if _, port, err := net.SplitHostPort(up.Address); err == nil {
		ck.port = port
	}
	ck.prov, ck.hasProv = providerFor(opts.Provider, up.Address)
	ck.run(ctx)
	ck.redact()
	return ck.rep
}

// redact removes from the report the secrets that the upstream's replies
// or its token endpoint's answers may repeat: every text in it that may
// hold one.
func (ck *checker) redact() {
	red := redactorFor(ck.up, ck.tokens)
	rep := &ck.rep
	for i := range rep.Steps {
		rep.Steps[i].Detail = red.Replace(rep.Steps[i].Detail)
	}
	for i := range rep.Extensions {
		rep.Extensions[i] = red.Replace(rep.Extensions[i])
	}
	rep.Problem, rep.Fix = red.Replace(rep.Problem), red.Replace(rep.Fix)
}

// checker runs one Check.
type checker struct {
	d       *Deliverer // its session code, for this one upstream
	up      *Upstream
	tokens  *tokenCache // for an OAuth2 login
	opts    CheckOptions
	rep     CheckReport
	port    string
	prov    Provider
	hasProv bool
}

func (ck *checker) step(name string, result StepResult, format string, args ...any) {
	ck.rep.Steps = append(ck.rep.Steps, CheckStep{Name: name, Result: result, Detail: fmt.Sprintf(format, args...)})
}

// fail sets the verdict, unless an earlier step already failed.
func (ck *checker) fail(problem, fix string) {
	if ck.rep.Verdict == VerdictFail {
		return
	}
	ck.rep.Verdict, ck.rep.Problem, ck.rep.Fix = VerdictFail, problem, fix
}

func (ck *checker) run(ctx context.Context) {
	d, up := ck.d, ck.up
	// As in Deliverer.connect, one timeout bounds everything up to the
	// login; the client's CommandTimeout then bounds each reply.
	cctx, cancel := context.WithTimeout(ctx, d.commandTimeout())
	defer cancel()
	raw, err := d.dial(cctx, up)
	if err != nil {
		ck.step(StepConnect, StepFailed, "%s", detailText(err))
		ck.connectFailed(err)
		return
	}
	ck.step(StepConnect, StepOK, "connected to %s", raw.RemoteAddr())
	// go-smtp takes no context: closing the connection is what
	// interrupts it.
	stop := context.AfterFunc(ctx, func() { _ = raw.Close() })
	defer stop()
	rec := &recordingConn{Conn: raw}
	c, err := d.startSession(cctx, rec, up)
	if err != nil {
		_ = raw.Close()
		ck.sessionFailed(ctx, err, rec)
		return
	}
	quit := true
	defer func() {
		if !quit || c.Quit() != nil {
			_ = c.Close()
		}
	}()
	if up.TLS == mailproto.TLSStartTLS {
		ck.step(StepStartTLS, StepOK, "offered and accepted (220)")
	}
	ck.tlsSession(c)
	ck.extensions(c)

	if up.Username == "" {
		ck.step(StepAuth, StepSkipped, "no username configured")
	} else {
		mech, err := authenticate(cctx, c, up, ck.tokens)
		ck.rep.AuthMechanism = mech
		if err != nil {
			quit = isSMTPError(err)
			ck.authFailed(mech, err)
			return
		}
		ck.step(StepAuth, StepOK, "%s as %s: accepted (235)", mech, up.Username)
	}

	sender, why := ck.sender()
	if sender == "" {
		ck.step(StepMail, StepSkipped, "%s", why)
		return
	}
	ck.rep.Sender = sender
	if err := c.Mail(sender, nil); err != nil {
		ck.step(StepMail, StepFailed, "<%s>: %s", sender, detailText(err))
		ck.mailFailed(sender, err)
		if quit = isSMTPError(err); quit {
			ck.reset(c)
		}
		return
	}
	ck.step(StepMail, StepOK, "<%s>: accepted (250)", sender)

	if r := ck.opts.Recipient; r == "" {
		ck.step(StepRcpt, StepSkipped, "no test recipient")
	} else {
		ck.rep.Recipient = r
		if err := c.Rcpt(r, nil); err != nil {
			ck.step(StepRcpt, StepFailed, "<%s>: %s", r, detailText(err))
			ck.rcptFailed(r, err)
			if quit = isSMTPError(err); !quit {
				return
			}
		} else {
			ck.step(StepRcpt, StepOK, "<%s>: accepted (250)", r)
		}
	}
	// RSET (RFC 5321 section 4.1.1.5) abandons the transaction: nothing
	// is sent.
	quit = ck.reset(c)
}

// reset ends the transaction with RSET and reports whether the session
// can still take QUIT.
func (ck *checker) reset(c *smtp.Client) bool {
	if err := c.Reset(); err != nil {
		ck.step(StepRset, StepFailed, "%s", detailText(err))
		ck.fail("the upstream refused RSET: "+detailText(err), "")
		return isSMTPError(err)
	}
	ck.step(StepRset, StepOK, "accepted (250)")
	return true
}

// sender is the MAIL FROM address to try, or "" and why there is none.
func (ck *checker) sender() (string, string) {
	switch {
	case ck.opts.Sender != "":
		return ck.opts.Sender, ""
	case ck.up.EnvelopeFrom != "":
		return ck.up.EnvelopeFrom, ""
	case isAddress(ck.up.Username):
		return ck.up.Username, ""
	}
	return "", "no test sender: no envelope_from, and the username is not an address"
}

// tlsSession reports the session's TLS.
func (ck *checker) tlsSession(c *smtp.Client) {
	state, ok := c.TLSConnectionState()
	if !ok {
		ck.step(StepTLS, StepSkipped, "plain text (tls = \"none\"): for a loopback upstream only")
		return
	}
	r := &TLSReport{
		Version:     tls.VersionName(state.Version),
		CipherSuite: tls.CipherSuiteName(state.CipherSuite),
		Verified:    len(state.VerifiedChains) > 0,
		Chain:       summarize(state.PeerCertificates),
	}
	ck.rep.TLS = r
	detail := r.Version + ", " + r.CipherSuite
	if len(r.Chain) > 0 {
		verdict := "verified"
		if !r.Verified {
			verdict = "NOT verified"
		}
		leaf := r.Chain[0]
		detail += fmt.Sprintf(", certificate %s: %q issued by %q, valid until %s",
			verdict, leaf.Subject, leaf.Issuer, leaf.NotAfter.UTC().Format(time.DateOnly))
	}
	ck.step(StepTLS, StepOK, "%s", detail)
}

// submissionExtensions are the EHLO keywords of the IANA registry of SMTP
// service extensions that matter to a submission client, in the order
// they are reported. go-smtp's client answers for one keyword at a time.
var submissionExtensions = []string{
	"SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING", "CHUNKING", "BINARYMIME", "DSN",
	"ENHANCEDSTATUSCODES", "REQUIRETLS", "STARTTLS", "AUTH", "LIMITS", "MT-PRIORITY",
	"DELIVERBY", "FUTURERELEASE", "RRVS",
}

func (ck *checker) extensions(c *smtp.Client) {
	for _, k := range submissionExtensions {
		ok, param := c.Extension(k)
		switch {
		case !ok:
		case param == "":
			ck.rep.Extensions = append(ck.rep.Extensions, k)
		default:
			ck.rep.Extensions = append(ck.rep.Extensions, k+" "+oneLine(param))
		}
	}
	if len(ck.rep.Extensions) == 0 {
		ck.step(StepEHLO, StepOK, "no extensions offered")
		return
	}
	ck.step(StepEHLO, StepOK, "%s", strings.Join(ck.rep.Extensions, ", "))
}

// connectFailed explains a failed dial.
func (ck *checker) connectFailed(err error) {
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, context.Canceled):
		ck.fail("the check was interrupted", "")
	case errors.As(err, &dnsErr):
		ck.fail("cannot resolve "+dnsErr.Name+": "+dnsErr.Err,
			"check the host name in address")
	case isTimeout(err):
		ck.fail(fmt.Sprintf("no answer from %s within %v", ck.up.Address, ck.d.commandTimeout()),
			"check address and port; a firewall may drop the traffic (many cloud providers block outgoing ports 25, 465 and 587 until asked)")
	case isRefused(err):
		ck.fail(fmt.Sprintf("connection to %s refused: nothing listens on port %s", ck.up.Address, ck.port),
			"check address and port: submission is 465 (tls = \"implicit\") or 587 (tls = \"starttls\")")
	default:
		ck.fail("cannot connect to "+ck.up.Address+": "+detailText(err),
			"check address and port, and this host's network")
	}
}

// sessionFailed explains a failure of startSession: the TLS handshake,
// STARTTLS, the greeting or EHLO.
func (ck *checker) sessionFailed(ctx context.Context, err error, rec *recordingConn) {
	var se *stageError
	if !errors.As(err, &se) {
		se = &stageError{stage: "connect", err: err}
	}
	cause := se.err
	text := detailText(cause)
	var (
		header tls.RecordHeaderError
		verify *tls.CertificateVerificationError
		alert  tls.AlertError
		reply  *smtp.SMTPError
	)
	switch {
	case se.stage == "connect":
		ck.step(StepConnect, StepFailed, "%s", text)
		ck.fail(text, "")

	case errors.As(cause, &verify):
		ck.step(StepTLS, StepFailed, "%s", certProblem(verify))
		ck.certFailed(verify)

	case errors.As(cause, &header):
		first := rec.firstLine()
		if ck.up.TLS == mailproto.TLSImplicit && looksLikeSMTP(header.RecordHeader[:]) {
			ck.step(StepTLS, StepFailed, "not TLS: the server sent an SMTP greeting first: %q", first)
			ck.fail(fmt.Sprintf("port %s speaks plain SMTP, not implicit TLS", ck.port),
				`use tls = "starttls" (usually port 587)`)
			return
		}
		ck.step(StepTLS, StepFailed, "not TLS: the server sent %q", first)
		ck.fail(fmt.Sprintf("port %s does not speak TLS", ck.port),
			"check the port: 465 is implicit TLS, 587 is STARTTLS")

	case errors.As(cause, &alert):
		ck.step(StepTLS, StepFailed, "%s", text)
		ck.fail("the upstream refused the TLS handshake: "+text,
			"the upstream may not accept TLS 1.2 or later, or the server name "+ck.serverName())

	case ctx.Err() != nil:
		ck.step(stepOf(se.stage), StepFailed, "interrupted")
		ck.fail("the check was interrupted", "")

	case ck.up.TLS != mailproto.TLSImplicit && (rec.bytes() == 0 || looksLikeTLS(rec.first())):
		// The client waits for the greeting while a server that speaks
		// TLS at once waits for its handshake: both wait until the
		// timeout, or until the server gives up. A second connection
		// tells whether it speaks TLS.
		name := stepOf(se.stage)
		greeting := fmt.Sprintf("no SMTP greeting within %v", ck.d.commandTimeout())
		switch {
		case rec.bytes() > 0:
			ck.step(name, StepFailed, "not SMTP: the server sent TLS records")
		case isTimeout(cause):
			ck.step(name, StepFailed, "%s", greeting)
		default:
			greeting = "no SMTP greeting before the connection ended"
			ck.step(name, StepFailed, "%s: %s", greeting, text)
		}
		if rec.bytes() > 0 || ck.speaksTLS(ctx) {
			ck.fail(fmt.Sprintf("port %s speaks TLS at once, not plain SMTP", ck.port),
				`use tls = "implicit" (usually port 465)`)
			return
		}
		ck.fail(greeting+" from "+ck.up.Address,
			"check address and port, and whether a firewall or proxy holds the connection")

	case isTimeout(cause):
		ck.step(stepOf(se.stage), StepFailed, "no reply within %v", ck.d.commandTimeout())
		fix := "check address and port"
		if ck.up.TLS == mailproto.TLSImplicit && rec.bytes() > 0 {
			fix = "TLS works but no SMTP greeting followed: check that port " + ck.port + " is an SMTP port"
		}
		ck.fail(fmt.Sprintf("the upstream did not answer within %v", ck.d.commandTimeout()), fix)

	case se.stage == "starttls" && strings.Contains(cause.Error(), "doesn't support STARTTLS"):
		// go-smtp's NewClientStartTLS reports it with this text only.
		ck.step(StepStartTLS, StepFailed, "not offered in the reply to EHLO")
		ck.fail(fmt.Sprintf("the upstream does not offer STARTTLS on port %s", ck.port),
			`use the provider's submission port: 587 with tls = "starttls", or 465 with tls = "implicit"; `+
				"if the port is right, something on the path may strip STARTTLS")

	case errors.As(cause, &reply):
		ck.step(stepOf(se.stage), StepFailed, "%s", text)
		if reply.Code/100 == 4 {
			ck.fail("the upstream refused the session for now: "+text, "try again later; the reply may say why")
			return
		}
		ck.fail("the upstream refused the session: "+text,
			"the reply usually says why, such as this host's IP address being blocked or listed")

	default:
		ck.step(stepOf(se.stage), StepFailed, "%s", text)
		ck.fail("the session broke: "+text, "check address, port and tls")
	}
}

// stepOf is the step in which startSession's stage failed.
func stepOf(stage string) string {
	switch stage {
	case "connect":
		return StepConnect
	case "tls":
		return StepTLS
	case "starttls":
		return StepStartTLS
	}
	return StepEHLO // "hello": the greeting or EHLO
}

// certFailed explains a certificate that did not verify.
func (ck *checker) certFailed(verify *tls.CertificateVerificationError) {
	chain := summarize(verify.UnverifiedCertificates)
	ck.rep.TLS = &TLSReport{VerifyError: oneLine(verify.Err.Error()), Chain: chain}
	leaf := CertSummary{}
	if len(chain) > 0 {
		leaf = chain[0]
	}
	var (
		unknown  x509.UnknownAuthorityError
		hostname x509.HostnameError
		invalid  x509.CertificateInvalidError
	)
	switch {
	case errors.As(verify.Err, &unknown):
		ck.fail(fmt.Sprintf("the certificate of %s is issued by %q, which this host does not trust", ck.serverName(), leaf.Issuer),
			`for a private CA, set ca_file = "/path/to/ca.pem" (the CA's certificate in PEM); `+
				"for a public one, update this host's CA certificates; else something on the path intercepts TLS")
	case errors.As(verify.Err, &hostname):
		names := leaf.DNSNames
		if len(names) == 0 {
			names = []string{leaf.Subject}
		}
		ck.fail(fmt.Sprintf("the certificate is for %s, not %s", strings.Join(names, ", "), ck.serverName()),
			fmt.Sprintf("set address to a name the certificate holds, such as %q", net.JoinHostPort(names[0], ck.port)))
	case errors.As(verify.Err, &invalid) && invalid.Reason == x509.Expired:
		ck.fail(fmt.Sprintf("the certificate of %s is expired or not yet valid (valid until %s)",
			ck.serverName(), leaf.NotAfter.UTC().Format(time.DateOnly)),
			"the upstream must renew it; also check this host's clock")
	default:
		ck.fail("the certificate of "+ck.serverName()+" did not verify: "+oneLine(verify.Err.Error()), "")
	}
}

// certProblem is the step detail for a certificate that did not verify.
func certProblem(verify *tls.CertificateVerificationError) string {
	if len(verify.UnverifiedCertificates) == 0 {
		return "certificate not verified: " + oneLine(verify.Err.Error())
	}
	leaf := verify.UnverifiedCertificates[0]
	return fmt.Sprintf("certificate NOT verified: %q issued by %q: %s",
		certName(leaf.Subject.CommonName, leaf.Subject.String()),
		certName(leaf.Issuer.CommonName, leaf.Issuer.String()),
		strings.TrimPrefix(oneLine(verify.Err.Error()), "x509: "))
}

// authFailed explains a failed login with mech ("" when none was chosen).
func (ck *checker) authFailed(mech string, err error) {
	up := ck.up
	text := detailText(err)
	if mech != "" {
		ck.step(StepAuth, StepFailed, "%s as %s: %s", mech, up.Username, text)
	} else {
		ck.step(StepAuth, StepFailed, "%s", text)
	}
	var se *smtp.SMTPError
	switch {
	case errors.Is(err, errGrantRefused):
		ck.fail("the OAuth2 token endpoint refused the grant: "+text,
			"renew the refresh token (oauth_refresh_token_file), or check oauth_client_id and oauth_client_secret_file; "+
				"a service account needs domain-wide delegation for the scope")
	case errors.Is(err, errTokenRefused):
		ck.fail("the upstream refused the OAuth2 access token for "+up.Username+": "+text,
			"check that the token's scope allows SMTP (Google: https://mail.google.com/; Microsoft 365: SMTP.Send or SMTP.SendAsApp) "+
				"and that SMTP AUTH is enabled for the mailbox")
	case errors.Is(err, errNoAuth):
		if ok, mechs := ck.extension("AUTH"); ok {
			ck.fail("the upstream offers AUTH "+mechs+", none of which this login can use",
				`a password needs PLAIN or LOGIN; OAuth2 needs XOAUTH2 or OAUTHBEARER (auth = "xoauth2" or "oauthbearer" with the oauth_* keys)`)
			return
		}
		if up.TLS == mailproto.TLSNone {
			ck.fail("the upstream offers no AUTH over plain text",
				`it may offer AUTH only after TLS: use tls = "starttls" (port 587) or "implicit" (port 465); `+
					"or leave username out if the upstream accepts this host by its IP address")
			return
		}
		ck.fail(fmt.Sprintf("the upstream offers no AUTH on port %s", ck.port),
			"port 25 is for server-to-server mail: use the submission port, 465 (tls = \"implicit\") or 587 (tls = \"starttls\"); "+
				"or leave username out if the upstream accepts this host by its IP address")
	case errors.As(err, &se) && (se.Code == 535 || se.Code == 534):
		ck.fail("password refused: "+text, ck.passwordFix())
	case errors.As(err, &se) && (se.Code == 530 || se.Code == 538):
		// RFC 4954 section 6: encryption required for the mechanism.
		ck.fail("the upstream requires encryption to log in: "+text,
			`use tls = "starttls" (port 587) or "implicit" (port 465)`)
	case errors.As(err, &se) && se.Code/100 == 4:
		ck.fail("the upstream could not check the login now: "+text, "try again later")
	case strings.HasPrefix(text, "oauth2"):
		ck.fail(text, "check oauth_token_url and that this host can reach it")
	default:
		ck.fail("login failed: "+text, "check username and the password or OAuth2 settings")
	}
}

// passwordFix is the advice for a refused password.
func (ck *checker) passwordFix() string {
	const check = "; check username and the password in password_env or password_file"
	if ck.hasProv {
		switch ck.prov.Name {
		case "gmail":
			return "Gmail needs an app password (Google Account > Security > 2-Step Verification > App passwords), not the account's password, or XOAUTH2" + check
		case "yandex":
			return "Yandex needs an app password (id.yandex.ru > Security > App passwords)" + check
		case "mailru":
			return "Mail.ru needs a password for external applications (account settings > Security)" + check
		case "yahoo":
			return "Yahoo needs an app password (Account security > Generate app password)" + check
		case "outlook365":
			return `Microsoft 365 is retiring basic authentication for SMTP: use auth = "xoauth2" with the oauth_* keys, ` +
				"and SMTP AUTH must be enabled for the mailbox" + check
		case "ses":
			return "Amazon SES takes the SMTP credentials made in the SES console for this region, not an IAM access key" + check
		case "mailgun":
			return "Mailgun takes the SMTP credentials of the sending domain (Domain settings > SMTP credentials)" + check
		case "google-workspace-relay":
			return "the Workspace SMTP relay takes a Workspace user's app password, or no username when it accepts this host by IP address" + check
		}
	}
	return "Gmail, Yahoo, Yandex and Mail.ru need an app password when 2-step verification is on" + check
}

// mailFailed explains a refused MAIL FROM.
func (ck *checker) mailFailed(sender string, err error) {
	up := ck.up
	text := detailText(err)
	var se *smtp.SMTPError
	if !errors.As(err, &se) {
		ck.fail("the connection broke at MAIL FROM: "+text, "")
		return
	}
	switch {
	case se.Code == 530:
		if up.Username == "" {
			ck.fail("the upstream requires authentication: "+text, "set username, and password_env or password_file")
			return
		}
		ck.fail("the upstream still requires authentication after the login: "+text,
			"check that the account may send over SMTP")
	case se.Code/100 == 4:
		ck.fail("the upstream deferred MAIL FROM <"+sender+">: "+text,
			"a temporary refusal (rate limit, throttled account, greylisting): try again later")
	case isAddress(up.Username) && !strings.EqualFold(sender, up.Username):
		ck.fail(fmt.Sprintf("the upstream does not let %s send as <%s>: %s", up.Username, sender, text),
			fmt.Sprintf("set envelope_from = %q (and dsn_from) so that mail leaves from the login's own address, "+
				"or make <%s> a verified sender of the login at the provider", up.Username, sender))
	case up.Username == "":
		ck.fail(fmt.Sprintf("the upstream refuses the sender <%s>: %s", sender, text),
			"the upstream may need a login (username) or may not accept this sender's domain")
	default:
		ck.fail(fmt.Sprintf("the upstream refuses the login's own address <%s>: %s", sender, text),
			"check the account at the provider: sending may be disabled, or the address must be a verified identity")
	}
}

// rcptFailed explains a refused RCPT TO.
func (ck *checker) rcptFailed(rcpt string, err error) {
	text := detailText(err)
	var se *smtp.SMTPError
	switch {
	case !errors.As(err, &se):
		ck.fail("the connection broke at RCPT TO: "+text, "")
	case se.Code/100 == 4:
		ck.fail("the upstream deferred RCPT TO <"+rcpt+">: "+text, "a temporary refusal: try again later")
	case se.EnhancedCode[0] == 5 && se.EnhancedCode[1] == 7 || se.Code == 554:
		// X.7.X: security or policy (RFC 3463 section 3.8), such as
		// relaying denied.
		ck.fail("the upstream refuses to relay to <"+rcpt+">: "+text,
			"check that the login may send to other domains (authenticated relay) at the provider")
	default:
		ck.fail("the upstream refuses the recipient <"+rcpt+">: "+text,
			"the address may not exist; try another with -to")
	}
}

// extension looks name up among the extensions the check found.
func (ck *checker) extension(name string) (bool, string) {
	for _, e := range ck.rep.Extensions {
		k, param, _ := strings.Cut(e, " ")
		if k == name {
			return true, param
		}
	}
	return false, ""
}

// speaksTLS reports whether the upstream completes, or at least answers, a
// TLS handshake on a new connection. Nothing is sent over it.
func (ck *checker) speaksTLS(ctx context.Context) bool {
	cfg, err := ck.up.clientTLS()
	if err != nil {
		return false
	}
	pctx, cancel := context.WithTimeout(ctx, ck.d.commandTimeout())
	defer cancel()
	raw, err := ck.d.dial(pctx, ck.up)
	if err != nil {
		return false
	}
	defer raw.Close()
	err = tls.Client(raw, cfg).HandshakeContext(pctx)
	var (
		verify *tls.CertificateVerificationError
		alert  tls.AlertError
	)
	// An untrusted certificate or an alert still comes from a TLS server.
	return err == nil || errors.As(err, &verify) || errors.As(err, &alert)
}

func (ck *checker) serverName() string {
	if host, _, err := net.SplitHostPort(ck.up.Address); err == nil {
		return host
	}
	return ck.up.Address
}

// providerFor finds the profile named name, else the one whose address
// has the host of address.
func providerFor(name, address string) (Provider, bool) {
	if name != "" {
		return LookupProvider(name)
	}
	host, _, err := net.SplitHostPort(address)
	if err != nil {
		return Provider{}, false
	}
	for _, p := range Providers() {
		phost, _, _ := net.SplitHostPort(p.Address)
		if pre, suf, ok := strings.Cut(phost, regionPlaceholder); ok {
			if len(host) > len(pre)+len(suf) && strings.HasPrefix(host, pre) && strings.HasSuffix(host, suf) {
				return p, true
			}
			continue
		}
		if strings.EqualFold(host, phost) {
			return p, true
		}
	}
	return Provider{}, false
}

func summarize(certs []*x509.Certificate) []CertSummary {
	out := make([]CertSummary, 0, len(certs))
	for _, c := range certs {
		out = append(out, CertSummary{
			Subject:  certName(c.Subject.CommonName, c.Subject.String()),
			Issuer:   certName(c.Issuer.CommonName, c.Issuer.String()),
			DNSNames: c.DNSNames,
			NotAfter: c.NotAfter,
		})
	}
	return out
}

// certName is a name's common name, else its whole distinguished name.
func certName(cn, dn string) string {
	if cn != "" {
		return cn
	}
	return dn
}

// looksLikeSMTP reports whether b starts like an SMTP reply line: three
// digits and a space or hyphen (RFC 5321 section 4.2).
func looksLikeSMTP(b []byte) bool {
	if len(b) < 4 {
		return false
	}
	for _, c := range b[:3] {
		if c < '0' || c > '9' {
			return false
		}
	}
	return b[3] == ' ' || b[3] == '-'
}

// looksLikeTLS reports whether b starts like a TLS record: handshake or
// alert, version 3.x (RFC 8446 section 5.1).
func looksLikeTLS(b []byte) bool {
	return len(b) >= 2 && (b[0] == 0x15 || b[0] == 0x16) && b[1] == 0x03
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, os.ErrDeadlineExceeded) ||
		errors.As(err, &ne) && ne.Timeout()
}

func isRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED)
}

// detailText describes err for a step or a verdict: the upstream's reply
// when there was one, else the cause without the operation and addresses
// that Go's network errors repeat.
func detailText(err error) string {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return formatReply(se)
	}
	var st *stageError
	if errors.As(err, &st) {
		err = st.err
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		err = op.Err
	}
	var sys *os.SyscallError
	if errors.As(err, &sys) {
		err = sys.Err // "connection refused", not "connect: connection refused"
	}
	return oneLine(strings.TrimPrefix(err.Error(), "smtp: "))
}

// isAddress reports whether s looks like local@domain.
func isAddress(s string) bool {
	at := strings.LastIndexByte(s, '@')
	return at > 0 && at < len(s)-1
}

// recordingConn keeps the first bytes the upstream sends, which tell what
// it speaks when the session fails. They come before any TLS and before
// AUTH, and hold no secret.
type recordingConn struct {
	net.Conn
	mu   sync.Mutex
	head []byte
	n    int
}

const recordBytes = 256

func (c *recordingConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	c.mu.Lock()
	c.n += n
	if room := recordBytes - len(c.head); room > 0 {
		c.head = append(c.head, p[:min(n, room)]...)
	}
	c.mu.Unlock()
	return n, err
}

// bytes is how many bytes were read.
func (c *recordingConn) bytes() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.n
}

// first returns a copy of the first bytes read.
func (c *recordingConn) first() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]byte(nil), c.head...)
}

// firstLine is the first line read, printable ASCII only.
func (c *recordingConn) firstLine() string {
	b := c.first()
	if i := strings.IndexAny(string(b), "\r\n"); i >= 0 {
		b = b[:i]
	}
	return strings.Map(func(r rune) rune {
		if r < 0x20 || r > 0x7e {
			return '.'
		}
		return r
	}, string(b))
}
