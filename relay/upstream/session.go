package upstream

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"smarthost/internal/mailproto"
)

// upstreamConn is an open, greeted and authenticated upstream connection.
type upstreamConn struct {
	upstream string // name, for results
	client   *smtp.Client
	raw      net.Conn // below TLS, for deadlines
	// stop detaches the connection from the context of the delivery using
	// it (see attach); nil when detached.
	stop      func() bool
	closed    bool        // closed by a delivery's context
	idleTimer *time.Timer // while idle: closes it after IdleTimeout
}

// connect dials up and prepares a session: TLS as configured, EHLO, AUTH
// (an OAuth2 login with a token from tokens). The connection is attached
// to ctx. Any failure here is the upstream's or ours, never the message's.
func (d *Deliverer) connect(ctx context.Context, up *Upstream, tokens *tokenCache) (*upstreamConn, error) {
	cctx, cancel := context.WithTimeout(ctx, d.commandTimeout())
	defer cancel()
	raw, err := d.dial(cctx, up)
	if err != nil {
		return nil, &stageError{stage: "connect", err: err}
	}
	uc := &upstreamConn{upstream: up.Name, raw: raw}
	uc.attach(ctx)
	c, err := d.startSession(cctx, newBatchConn(raw), up)
	if err != nil {
		uc.detach()
		_ = raw.Close()
		return nil, err
	}
	uc.client = c
	if up.Username != "" {
		if _, err := authenticate(cctx, c, up, tokens); err != nil {
			uc.close(isSMTPError(err))
			return nil, &stageError{stage: "auth", err: err}
		}
	}
	return uc, nil
}

// dial opens a TCP connection to up with the Deliverer's Dial.
func (d *Deliverer) dial(ctx context.Context, up *Upstream) (net.Conn, error) {
	return d.Dial(ctx, "tcp", up.Address)
}

// startSession protects raw as up.TLS says and introduces the relay with
// EHLO. cctx bounds the TLS handshake and, with STARTTLS, everything
// before TLS. A failure is a *stageError naming the step ("connect",
// "tls", "starttls", "hello"); the caller closes raw.
func (d *Deliverer) startSession(cctx context.Context, raw net.Conn, up *Upstream) (*smtp.Client, error) {
	fail := func(stage string, err error) (*smtp.Client, error) {
		return nil, &stageError{stage: stage, err: err}
	}
	cfg, err := up.clientTLS()
	if err != nil {
		return fail("connect", err)
	}
	var c *smtp.Client
	switch up.TLS {
	case mailproto.TLSImplicit:
		tc := tls.Client(raw, cfg)
		if err := tc.HandshakeContext(cctx); err != nil {
			return fail("tls", err)
		}
		c = smtp.NewClient(tc)
	case mailproto.TLSStartTLS:
		// NewClientStartTLS fails when STARTTLS is not offered: the session
		// never continues in plain text. It introduces itself as
		// "localhost" before TLS; the EHLO that counts is the one after
		// (RFC 3207 section 4.2), which uses Hostname.
		//
		// It reads the greeting and the EHLO and STARTTLS replies under
		// go-smtp's own five-minute timeout, before CommandTimeout can be
		// set on the client; an upstream silent there would hold the
		// delivery that long. Closing the connection when cctx ends
		// bounds the three by one CommandTimeout.
		stop := context.AfterFunc(cctx, func() { _ = raw.Close() })
		c, err = smtp.NewClientStartTLS(raw, cfg)
		if !stop() {
			return fail("starttls", fmt.Errorf("no reply within %v: %w", d.commandTimeout(), context.Cause(cctx)))
		}
		if err != nil {
			return fail("starttls", err)
		}
	case mailproto.TLSNone:
		c = smtp.NewClient(raw)
	default:
		return fail("connect", fmt.Errorf("unknown TLS mode %q", up.TLS))
	}
	c.CommandTimeout = d.commandTimeout()
	c.SubmissionTimeout = d.dataTimeout()
	if err := c.Hello(d.Hostname); err != nil {
		if isTLSError(err) {
			// After STARTTLS the handshake happens at the first EHLO.
			return fail("tls", err)
		}
		return fail("hello", err)
	}
	return c, nil
}

// clientTLS is the TLS configuration for connections to up: its host name
// verified against RootCAs, TLS 1.2 or later.
func (up *Upstream) clientTLS() (*tls.Config, error) {
	host, _, err := net.SplitHostPort(up.Address)
	if err != nil {
		return nil, err
	}
	return &tls.Config{ServerName: host, RootCAs: up.RootCAs, MinVersion: tls.VersionTLS12}, nil
}

// authenticate logs in with PLAIN, or LOGIN where PLAIN is not offered
// (RFC 4954), and returns the mechanism it chose ("" when none fits).
// Both send the password in the clear, which is why the connection is
// protected by TLS unless configured otherwise. An upstream with OAuth2
// gets an access token from tokens instead (see authenticateOAuth).
func authenticate(ctx context.Context, c *smtp.Client, up *Upstream, tokens *tokenCache) (mech string, err error) {
	if mode := up.authMode(); mode != AuthPassword {
		return authenticateOAuth(ctx, c, up, mode, tokens)
	}
	switch {
	case c.SupportsAuth(sasl.Plain):
		return sasl.Plain, c.Auth(sasl.NewPlainClient("", up.Username, up.Password))
	case c.SupportsAuth(sasl.Login):
		return sasl.Login, c.Auth(sasl.NewLoginClient(up.Username, up.Password))
	}
	return "", noAuth(c)
}

// attach makes cancelling ctx close the connection: go-smtp's client takes
// no context, and closing the connection is what interrupts a command in
// progress.
func (uc *upstreamConn) attach(ctx context.Context) {
	raw := uc.raw
	uc.stop = context.AfterFunc(ctx, func() { _ = raw.Close() })
}

// detach undoes attach. It reports false if the context has closed the
// connection.
func (uc *upstreamConn) detach() bool {
	if uc.stop != nil {
		if !uc.stop() {
			uc.closed = true
		}
		uc.stop = nil
	}
	return !uc.closed
}

// close ends the session with QUIT when quit says the upstream can still
// answer, else just closes the connection.
func (uc *upstreamConn) close(quit bool) {
	if uc.detach() && quit {
		if err := uc.client.Quit(); err == nil {
			return
		}
	}
	_ = uc.client.Close()
}

// authRefused reports whether an AUTH failure is our misconfiguration:
// the credentials refused (535), the mechanism too weak (534), encryption
// or authentication required (538, 530), or no mechanism we can use.
func authRefused(err error) bool {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		switch se.Code {
		case 530, 534, 535, 538:
			return true
		}
		return false
	}
	// authenticate's own errors: AUTH not offered, or no usable
	// mechanism; an OAuth2 token refused by OAUTHBEARER's error
	// challenge; the token endpoint refusing our grant.
	return errors.Is(err, errNoAuth) || errors.Is(err, errTokenRefused) || errors.Is(err, errGrantRefused)
}

// errNoAuth is an upstream that offers no AUTH mechanism we can use while
// credentials are configured for it.
var errNoAuth = errors.New("no usable AUTH")

func isTLSError(err error) bool {
	var (
		verify *tls.CertificateVerificationError
		alert  tls.AlertError
		record tls.RecordHeaderError
	)
	return errors.As(err, &verify) || errors.As(err, &alert) || errors.As(err, &record)
}
