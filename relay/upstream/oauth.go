package upstream

import (
	"cmp"
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/oauth2"
	"golang.org/x/oauth2/clientcredentials"
	"golang.org/x/oauth2/jwt"
)

// AuthMode says how the relay logs in to an upstream that has a Username.
type AuthMode string

const (
	// AuthPassword logs in with PLAIN, or LOGIN where PLAIN is not offered.
	AuthPassword AuthMode = "password"
	// AuthXOAUTH2 logs in with Google's XOAUTH2 mechanism and an OAuth2
	// access token; Microsoft 365 takes it too.
	AuthXOAUTH2 AuthMode = "xoauth2"
	// AuthOAuthBearer logs in with OAUTHBEARER (RFC 7628) and an OAuth2
	// access token.
	AuthOAuthBearer AuthMode = "oauthbearer"
	// AuthOAuth2 uses OAUTHBEARER when the upstream offers it, else
	// XOAUTH2.
	AuthOAuth2 AuthMode = "oauth2"
)

// Mechanism names that go-sasl has no constant for.
const xoauth2Mech = "XOAUTH2"

// Default scopes of the flows that ask for scopes: full SMTP access to a
// Gmail mailbox, and Exchange Online's application permissions (such as
// SMTP.SendAsApp) granted to the app.
const (
	DefaultGoogleScope    = "https://mail.google.com/"
	DefaultMicrosoftScope = "https://outlook.office365.com/.default"
)

// OAuth says how to obtain an upstream's OAuth2 access tokens. The flow
// is chosen by the fields set, exactly one of:
//
//   - RefreshToken: the refresh-token grant (RFC 6749 section 6) at
//     TokenURL, with ClientID and, unless the client is public,
//     ClientSecret; for a mailbox whose owner consented once.
//   - ServiceAccount: a Google service account's signed JWT (RFC 7523)
//     for Subject, the mailbox it acts for through domain-wide
//     delegation; TokenURL, when set, overrides the key's token_uri.
//   - ClientCredentials: the client-credentials grant (RFC 6749 section
//     4.4) at TokenURL with ClientID and ClientSecret, as Microsoft 365
//     grants application access to mailboxes.
//
// Tokens are fetched when first needed, cached per upstream and shared by
// its deliveries, and renewed EarlyExpiry before they expire.
type OAuth struct {
	TokenURL          string
	ClientID          string
	ClientSecret      string
	RefreshToken      string
	ServiceAccount    *ServiceAccount
	Subject           string
	ClientCredentials bool
	// Scopes asked for by the ServiceAccount and ClientCredentials flows;
	// defaults DefaultGoogleScope and DefaultMicrosoftScope. A refresh
	// token keeps the scopes it was granted with.
	Scopes []string
	// Client makes the token requests; nil means a client with a 30 s
	// timeout and the environment's proxy settings.
	Client *http.Client
	// EarlyExpiry is how long before its expiry a token is replaced, so
	// that none expires between AUTH and its check; default 60s, at most
	// half the token's lifetime.
	EarlyExpiry time.Duration
}

// String describes o without its secrets, so that printing an Upstream
// (%v, %+v) does not reveal them.
func (o *OAuth) String() string {
	if o == nil {
		return "<nil>"
	}
	flow := "refresh token"
	switch {
	case o.ServiceAccount != nil:
		flow = "service account " + o.ServiceAccount.ClientEmail + " for " + o.Subject
	case o.ClientCredentials:
		flow = "client credentials"
	}
	return fmt.Sprintf("OAuth2 %s, client %q, token URL %q", flow, o.ClientID, o.TokenURL)
}

// GoString is String, for %#v.
func (o *OAuth) GoString() string { return o.String() }

// ServiceAccount is what the JWT flow uses from a Google service account
// key (the JSON file the Cloud console downloads).
type ServiceAccount struct {
	ClientEmail  string
	PrivateKey   []byte // PEM, RSA
	PrivateKeyID string
	TokenURI     string
}

// ParseServiceAccount reads a Google service account JSON key. It checks
// the fields the JWT flow needs and that the private key is RSA.
func ParseServiceAccount(data []byte) (*ServiceAccount, error) {
	var k struct {
		Type         string `json:"type"`
		ClientEmail  string `json:"client_email"`
		PrivateKey   string `json:"private_key"`
		PrivateKeyID string `json:"private_key_id"`
		TokenURI     string `json:"token_uri"`
	}
	if err := json.Unmarshal(data, &k); err != nil {
		return nil, fmt.Errorf("not a service account JSON key: %w", err)
	}
	if k.Type != "service_account" {
		return nil, fmt.Errorf(`type is %q, not "service_account"`, k.Type)
	}
	if k.ClientEmail == "" || k.PrivateKey == "" || k.TokenURI == "" {
		return nil, errors.New("client_email, private_key and token_uri are required")
	}
	if _, err := parseRSAKey([]byte(k.PrivateKey)); err != nil {
		return nil, fmt.Errorf("private_key: %w", err)
	}
	return &ServiceAccount{
		ClientEmail:  k.ClientEmail,
		PrivateKey:   []byte(k.PrivateKey),
		PrivateKeyID: k.PrivateKeyID,
		TokenURI:     k.TokenURI,
	}, nil
}

// parseRSAKey reads a PEM RSA key, PKCS#8 or PKCS#1, as jwt.Config does.
func parseRSAKey(data []byte) (*rsa.PrivateKey, error) {
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, errors.New("no PEM block")
	}
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		rk, ok := k.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%T is not an RSA key", k)
		}
		return rk, nil
	}
	k, err := x509.ParsePKCS1PrivateKey(block.Bytes)
	if err != nil {
		return nil, errors.New("neither a PKCS#8 nor a PKCS#1 RSA key")
	}
	return k, nil
}

// authMode is how the relay logs in to up.
func (up *Upstream) authMode() AuthMode {
	switch {
	case up.Auth != "":
		return up.Auth
	case up.OAuth != nil:
		return AuthOAuth2
	}
	return AuthPassword
}

// Errors of OAuth2 logins, for the classification in try and authRefused.
var (
	// errTokenRefused: the upstream refused an access token. It may have
	// been revoked or have expired early; one new token is worth a try.
	errTokenRefused = errors.New("upstream refused the OAuth2 token")
	// errGrantRefused: the token endpoint refused our grant (a revoked
	// refresh token, a wrong client secret, a missing delegation): our
	// configuration, which retrying cannot fix.
	errGrantRefused = errors.New("oauth2 token request refused")
)

// authenticateOAuth logs in to up with an OAuth2 access token by
// OAUTHBEARER or XOAUTH2, as mode says. A refused token is dropped from
// the cache, and the error wraps errTokenRefused so that the caller may try
// once more with a new one. It returns the mechanism it chose, "" when the
// upstream offers none that fits.
func authenticateOAuth(ctx context.Context, c *smtp.Client, up *Upstream, mode AuthMode, tokens *tokenCache) (string, error) {
	mech := ""
	switch {
	case mode == AuthOAuthBearer || mode == AuthOAuth2 && c.SupportsAuth(sasl.OAuthBearer):
		mech = sasl.OAuthBearer
	case mode == AuthXOAUTH2 || mode == AuthOAuth2:
		mech = xoauth2Mech
	default:
		return "", fmt.Errorf("%w: unknown auth mode %q", errNoAuth, mode)
	}
	if !c.SupportsAuth(mech) {
		return "", noAuth(c)
	}
	if tokens == nil {
		return "", fmt.Errorf("%w: %s without OAuth2 configuration", errNoAuth, mech)
	}
	token, err := tokens.token(ctx)
	if err != nil {
		return mech, err
	}
	var client sasl.Client
	if mech == sasl.OAuthBearer {
		// RFC 7628 section 3.1: host and port name the server the token
		// is presented to.
		host, portText, _ := net.SplitHostPort(up.Address)
		port, _ := strconv.Atoi(portText)
		client = sasl.NewOAuthBearerClient(&sasl.OAuthBearerOptions{Username: up.Username, Token: token, Host: host, Port: port})
	} else {
		client = &xoauth2Client{username: up.Username, token: token}
	}
	err = c.Auth(client)
	if err == nil {
		return mech, nil
	}
	var se *smtp.SMTPError
	var be *sasl.OAuthBearerError
	// 535 is Gmail's and Microsoft's answer to a bad token, after the
	// error challenge; 454 (RFC 4954 section 6) a temporary failure to
	// check it. OAUTHBEARER's error challenge is answered by cancelling
	// the exchange (RFC 7628 section 3.2.2), which go-sasl reports as an
	// OAuthBearerError.
	if errors.As(err, &be) || errors.As(err, &se) && (se.Code == 535 || se.Code == 454) {
		tokens.invalidate(token)
		return mech, fmt.Errorf("%w: %w", errTokenRefused, err)
	}
	return mech, err
}

// noAuth is the error for an upstream that offers no mechanism we can use.
func noAuth(c *smtp.Client) error {
	if ok, mechs := c.Extension("AUTH"); ok {
		return fmt.Errorf("%w: offered %s", errNoAuth, mechs)
	}
	return fmt.Errorf("%w: not offered", errNoAuth)
}

// xoauth2Client is the client side of XOAUTH2
// (https://developers.google.com/gmail/imap/xoauth2-protocol), which has
// no RFC: the initial response carries the user and the bearer token; a
// refusal comes as a 334 challenge holding a base64 JSON status, which
// the client answers with an empty line to get the final 535 or 454.
type xoauth2Client struct {
	username, token string
	challenged      bool
}

func (a *xoauth2Client) Start() (mech string, ir []byte, err error) {
	// \x01 separates the fields; one inside a field would forge another.
	if strings.ContainsRune(a.username, 1) || strings.ContainsRune(a.token, 1) {
		return "", nil, errors.New("xoauth2: control character in user or token")
	}
	return xoauth2Mech, []byte("user=" + a.username + "\x01auth=Bearer " + a.token + "\x01\x01"), nil
}

func (a *xoauth2Client) Next(challenge []byte) ([]byte, error) {
	if a.challenged {
		return nil, errors.New("xoauth2: unexpected second challenge")
	}
	a.challenged = true
	// The challenge is the error status; the server's final reply, which
	// the empty response asks for, says the same in SMTP terms.
	return []byte{}, nil
}

// tokenCache holds one upstream's current OAuth2 access token for all its
// deliveries. Concurrent deliveries that need a new token wait for one
// request to the token endpoint instead of making one each.
type tokenCache struct {
	upstream string
	oauth    *OAuth
	client   *http.Client
	now      func() time.Time
	logger   func() *slog.Logger // the Deliverer's, read when used

	mu      sync.Mutex
	tok     *oauth2.Token
	fetched time.Time  // when tok was obtained
	refresh string     // the refresh token, as the server last rotated it
	call    *tokenCall // the request in progress, if any
	// issued are the last access and rotated refresh tokens obtained,
	// newest last, tok's among them: a connection that logged in with
	// an older one may still be open, and a reply may repeat it.
	issued []string
}

// keepIssued is how many tokens tokenCache.issued keeps: a few lifetimes
// of an access token, each renewed shortly before it expires.
const keepIssued = 8

// tokenCall is one request to the token endpoint that several deliveries
// may wait on.
type tokenCall struct {
	done  chan struct{}
	token string
	err   error
}

// newTokenCache returns an empty token cache for up, nil when up has no
// OAuth configuration.
func newTokenCache(up *Upstream, now func() time.Time, logger func() *slog.Logger) *tokenCache {
	if up.OAuth == nil {
		return nil
	}
	client := up.OAuth.Client
	if client == nil {
		client = &http.Client{Timeout: 30 * time.Second}
	}
	return &tokenCache{
		upstream: up.Name,
		oauth:    up.OAuth,
		client:   client,
		now:      now,
		logger:   logger,
		refresh:  up.OAuth.RefreshToken,
	}
}

// token returns a valid access token: the cached one, or a new one.
func (tc *tokenCache) token(ctx context.Context) (string, error) {
	tc.mu.Lock()
	if tc.validLocked() {
		t := tc.tok.AccessToken
		tc.mu.Unlock()
		return t, nil
	}
	if ctx.Err() != nil {
		tc.mu.Unlock()
		return "", fmt.Errorf("oauth2 token request: %w", context.Cause(ctx))
	}
	call := tc.call
	if call == nil {
		call = &tokenCall{done: make(chan struct{})}
		tc.call = call
		go tc.fetch(context.WithoutCancel(ctx), call)
	}
	tc.mu.Unlock()
	select {
	case <-call.done:
		return call.token, call.err
	case <-ctx.Done():
		return "", fmt.Errorf("oauth2 token request: %w", context.Cause(ctx))
	}
}

// tokenRequestTimeout bounds one request to the token endpoint, which
// deliveries waiting for it do not cancel: the token is for all of them.
const tokenRequestTimeout = 30 * time.Second

// fetch makes call's request and stores the token it gets.
func (tc *tokenCache) fetch(ctx context.Context, call *tokenCall) {
	ctx, cancel := context.WithTimeout(ctx, tokenRequestTimeout)
	defer cancel()
	tc.mu.Lock()
	refresh := tc.refresh
	tc.mu.Unlock()

	start := tc.now()
	tok, err := tc.request(ctx, refresh)
	if err == nil && tok.AccessToken == "" {
		err = errors.New("oauth2: no access_token in the answer")
	}

	tc.mu.Lock()
	tc.call = nil
	if err != nil {
		call.err = tokenError(err, redactor(append(oauthSecrets(tc.oauth), tc.issued...)))
		tc.mu.Unlock()
		close(call.done)
		tc.logger().Warn("oauth2 token request failed", "upstream", tc.upstream, "err", call.err)
		return
	}
	tc.tok, tc.fetched, call.token = tok, start, tok.AccessToken
	tc.remember(tok.AccessToken)
	rotated := tok.RefreshToken != "" && tok.RefreshToken != tc.refresh
	if rotated {
		tc.refresh = tok.RefreshToken
		tc.remember(tok.RefreshToken)
	}
	tc.mu.Unlock()
	close(call.done)

	attrs := []any{"upstream", tc.upstream}
	if !tok.Expiry.IsZero() {
		attrs = append(attrs, "expires", tok.Expiry.UTC().Format(time.RFC3339))
	}
	if rotated {
		// Kept in memory only: the file is the operator's.
		attrs = append(attrs, "refresh_token_rotated", true)
	}
	tc.logger().Info("oauth2 token obtained", attrs...)
}

// remember adds token to issued. tc.mu must be held.
func (tc *tokenCache) remember(token string) {
	tc.issued = append(tc.issued, token)
	if n := len(tc.issued); n > keepIssued {
		tc.issued = slices.Delete(tc.issued, 0, n-keepIssued)
	}
}

// tokens returns the tokens the cache obtained that a text may repeat.
func (tc *tokenCache) tokens() []string {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return slices.Clone(tc.issued)
}

// request asks the token endpoint for a new token by the configured flow.
func (tc *tokenCache) request(ctx context.Context, refresh string) (*oauth2.Token, error) {
	o := tc.oauth
	ctx = context.WithValue(ctx, oauth2.HTTPClient, tc.client)
	switch {
	case o.ServiceAccount != nil:
		sa := o.ServiceAccount
		conf := &jwt.Config{
			Email:        sa.ClientEmail,
			PrivateKey:   sa.PrivateKey,
			PrivateKeyID: sa.PrivateKeyID,
			Subject:      o.Subject,
			Scopes:       scopesOr(o.Scopes, DefaultGoogleScope),
			TokenURL:     cmp.Or(o.TokenURL, sa.TokenURI),
		}
		return conf.TokenSource(ctx).Token()
	case o.ClientCredentials:
		conf := &clientcredentials.Config{
			ClientID:     o.ClientID,
			ClientSecret: o.ClientSecret,
			TokenURL:     o.TokenURL,
			Scopes:       scopesOr(o.Scopes, DefaultMicrosoftScope),
			// Google's and Microsoft's endpoints take the client's
			// credentials in the form; fixing it spares a probe request.
			AuthStyle: oauth2.AuthStyleInParams,
		}
		return conf.Token(ctx)
	case refresh != "":
		conf := &oauth2.Config{
			ClientID:     o.ClientID,
			ClientSecret: o.ClientSecret,
			Endpoint:     oauth2.Endpoint{TokenURL: o.TokenURL, AuthStyle: oauth2.AuthStyleInParams},
		}
		// A source without an access token refreshes at once.
		return conf.TokenSource(ctx, &oauth2.Token{RefreshToken: refresh}).Token()
	}
	return nil, errors.New("no OAuth2 flow configured")
}

// validLocked reports whether the cached token may still be used: it is
// at least EarlyExpiry, or half its lifetime if that is shorter, from
// expiring. A token without an expiry is used until the upstream refuses
// it. tc.mu must be held.
func (tc *tokenCache) validLocked() bool {
	if tc.tok == nil {
		return false
	}
	if tc.tok.Expiry.IsZero() {
		return true
	}
	early := tc.oauth.EarlyExpiry
	if early <= 0 {
		early = 60 * time.Second
	}
	early = min(early, tc.tok.Expiry.Sub(tc.fetched)/2)
	return tc.now().Add(early).Before(tc.tok.Expiry)
}

// invalidate drops the cached token if it is still token, which the
// upstream refused, so that the next delivery fetches a new one. When
// several deliveries saw the same token refused, only the first drops it.
func (tc *tokenCache) invalidate(token string) {
	tc.mu.Lock()
	dropped := tc.tok != nil && tc.tok.AccessToken == token
	if dropped {
		tc.tok = nil
	}
	tc.mu.Unlock()
	if dropped {
		tc.logger().Debug("oauth2 token dropped after the upstream refused it", "upstream", tc.upstream)
	}
}

// expiry is when the cached token expires; zero when none is cached or it
// has no expiry.
func (tc *tokenCache) expiry() time.Time {
	if tc == nil {
		return time.Time{}
	}
	tc.mu.Lock()
	defer tc.mu.Unlock()
	if tc.tok == nil {
		return time.Time{}
	}
	return tc.tok.Expiry
}

// tokenError describes a failed token request for logs and results
// without the endpoint's response body, which may echo what was sent, and
// without its URL. What it keeps of the endpoint's answer (the status,
// error and error_description) goes through red, which removes the
// secrets the endpoint may repeat. A refused grant wraps errGrantRefused.
func tokenError(err error, red *strings.Replacer) error {
	var re *oauth2.RetrieveError
	if errors.As(err, &re) {
		status := ""
		if re.Response != nil {
			status = red.Replace(oneLine(re.Response.Status))
		}
		code, desc := re.ErrorCode, re.ErrorDescription
		if code == "" {
			// The JWT flow leaves RFC 6749 section 5.2's fields in the
			// body; read those two and nothing else of it.
			var body struct {
				Code string `json:"error"`
				Desc string `json:"error_description"`
			}
			if json.Unmarshal(re.Body, &body) == nil {
				code, desc = body.Code, body.Desc
			}
		}
		if code == "" {
			return fmt.Errorf("oauth2 token endpoint answered %s", status)
		}
		// Redacted before it is cut, so that no part of a secret is left.
		code, desc = red.Replace(oneLine(code)), red.Replace(oneLine(desc))
		if len(desc) > 200 {
			desc = desc[:200]
		}
		switch code {
		case "invalid_grant", "invalid_client", "unauthorized_client", "invalid_scope":
			// RFC 6749 section 5.2: the grant or the client is refused.
			if desc != "" {
				return fmt.Errorf("%w: %s (%s)", errGrantRefused, code, desc)
			}
			return fmt.Errorf("%w: %s", errGrantRefused, code)
		}
		return fmt.Errorf("oauth2 token endpoint answered %s: %s", status, code)
	}
	var ue *url.Error
	if errors.As(err, &ue) {
		detail := ue.Err
		var op *net.OpError
		if errors.As(detail, &op) && op.Err != nil {
			detail = op.Err
		}
		return fmt.Errorf("oauth2 token endpoint: %w", detail)
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("oauth2 token request: %w", err)
	}
	// The JWT flow flattens its transport errors into text that holds the
	// endpoint's URL; keep the last part, the cause.
	text := err.Error()
	if i := strings.LastIndex(text, ": "); strings.HasPrefix(text, "oauth2: cannot fetch token: Post ") && i >= 0 {
		text = text[i+2:]
	}
	return fmt.Errorf("oauth2 token request failed: %s", red.Replace(oneLine(strings.TrimPrefix(text, "oauth2: "))))
}

func scopesOr(scopes []string, def string) []string {
	if len(scopes) == 0 {
		return []string{def}
	}
	return scopes
}
