package upstream

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/oauth2"

	"smarthost/internal/mailproto"
	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/queue"
)

const (
	oauthClientID     = "client-1234.apps.example"
	oauthClientSecret = "client-secret-GOCSPX-0123456789"
	oauthRefreshToken = "1//refresh-token-abcdefghijklmnop"
	saEmail           = "relay@project.iam.gserviceaccount.example"
)

// tokenServer is an OAuth2 token endpoint (RFC 6749 section 3.2) on
// loopback: the refresh-token, JWT-bearer (RFC 7523) and client-credentials
// grants, each checking the client's credentials. It keeps the tokens it
// issued with their expiry by its clock, so that upstreams can check them.
type tokenServer struct {
	t     *testing.T
	srv   *httptest.Server
	clock *fakeClock
	saKey *rsa.PublicKey // verifies JWT assertions

	mu        sync.Mutex
	expiresIn int // seconds, for new tokens
	subject   string
	grants    []string             // grant_type of every request, in order
	issued    []string             // tokens, in order
	expiry    map[string]time.Time // by token, on clock
	revoked   map[string]bool
}

func startTokenServer(t *testing.T, clock *fakeClock) *tokenServer {
	ts := &tokenServer{t: t, clock: clock, expiresIn: 3600, subject: upUser,
		expiry: map[string]time.Time{}, revoked: map[string]bool{}}
	ts.srv = httptest.NewTLSServer(http.HandlerFunc(ts.serve))
	t.Cleanup(ts.srv.Close)
	return ts
}

func (ts *tokenServer) URL() string { return ts.srv.URL + "/token" }

func (ts *tokenServer) serve(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != "/token" || r.Method != http.MethodPost {
		http.NotFound(w, r)
		return
	}
	if err := r.ParseForm(); err != nil {
		ts.refuse(w, "invalid_request")
		return
	}
	grant := r.PostForm.Get("grant_type")
	ts.mu.Lock()
	ts.grants = append(ts.grants, grant)
	ts.mu.Unlock()
	client := r.PostForm.Get("client_id") == oauthClientID && r.PostForm.Get("client_secret") == oauthClientSecret
	switch grant {
	case "refresh_token":
		if !client {
			ts.refuse(w, "invalid_client")
			return
		}
		if r.PostForm.Get("refresh_token") != oauthRefreshToken {
			ts.refuse(w, "invalid_grant")
			return
		}
	case "client_credentials":
		if !client {
			ts.refuse(w, "invalid_client")
			return
		}
		if r.PostForm.Get("scope") != DefaultMicrosoftScope {
			ts.refuse(w, "invalid_scope")
			return
		}
	case "urn:ietf:params:oauth:grant-type:jwt-bearer":
		assertion := r.PostForm.Get("assertion")
		claims, err := verifyAssertion(assertion, ts.saKey)
		ts.mu.Lock()
		subject := ts.subject
		ts.mu.Unlock()
		if err != nil || claims.Iss != saEmail || claims.Sub != subject || claims.Aud != ts.URL() ||
			claims.Scope != DefaultGoogleScope || claims.Exp <= time.Now().Unix() {
			ts.refuse(w, "invalid_grant")
			return
		}
	default:
		ts.refuse(w, "unsupported_grant_type")
		return
	}
	ts.issue(w)
}

// assertionClaims are the claims of a service account's JWT assertion
// that Google's token endpoint checks.
type assertionClaims struct {
	Iss   string `json:"iss"`
	Sub   string `json:"sub"`
	Aud   string `json:"aud"`
	Scope string `json:"scope"`
	Exp   int64  `json:"exp"`
}

// verifyAssertion checks an RS256 JWT (RFC 7515 compact form, RFC 7518
// §3.3) with the service account's public key, as the token endpoint
// does, and returns its claims.
func verifyAssertion(assertion string, key *rsa.PublicKey) (*assertionClaims, error) {
	if key == nil {
		return nil, errors.New("no service account key")
	}
	parts := strings.Split(assertion, ".")
	if len(parts) != 3 {
		return nil, errors.New("not a compact JWS")
	}
	var header struct {
		Alg string `json:"alg"`
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[0])
	if err != nil || json.Unmarshal(raw, &header) != nil || header.Alg != "RS256" {
		return nil, fmt.Errorf("header %q: want alg RS256", raw)
	}
	sig, err := base64.RawURLEncoding.DecodeString(parts[2])
	if err != nil {
		return nil, err
	}
	digest := sha256.Sum256([]byte(parts[0] + "." + parts[1]))
	if err := rsa.VerifyPKCS1v15(key, crypto.SHA256, digest[:], sig); err != nil {
		return nil, err
	}
	raw, err = base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return nil, err
	}
	var c assertionClaims
	if err := json.Unmarshal(raw, &c); err != nil {
		return nil, err
	}
	return &c, nil
}

func (ts *tokenServer) issue(w http.ResponseWriter) {
	b := make([]byte, 16)
	_, _ = rand.Read(b)
	tok := "ya29.access-" + hex.EncodeToString(b)
	ts.mu.Lock()
	expiresIn := ts.expiresIn
	ts.issued = append(ts.issued, tok)
	ts.expiry[tok] = ts.clock.Now().Add(time.Duration(expiresIn) * time.Second)
	ts.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"access_token": tok, "token_type": "Bearer", "expires_in": expiresIn})
}

func (ts *tokenServer) refuse(w http.ResponseWriter, code string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusBadRequest)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": code, "error_description": "refused by the test server"})
}

// valid reports whether tok was issued, is not revoked and has not
// expired by the server's clock.
func (ts *tokenServer) valid(tok string) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	exp, ok := ts.expiry[tok]
	return ok && !ts.revoked[tok] && ts.clock.Now().Before(exp)
}

func (ts *tokenServer) setExpiresIn(s int) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	ts.expiresIn = s
}

func (ts *tokenServer) revokeAll() {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	for _, tok := range ts.issued {
		ts.revoked[tok] = true
	}
}

// requests returns the grant types asked for so far.
func (ts *tokenServer) requests() []string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return slices.Clone(ts.grants)
}

func (ts *tokenServer) tokens() []string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return slices.Clone(ts.issued)
}

// authAttempt is one AUTH exchange an oauthUpstream saw.
type authAttempt struct {
	mech, user string
	ok         bool
	expired    bool // the token had been issued but expired
}

// oauthUpstream is a go-smtp upstream that accepts XOAUTH2 and, if asked,
// OAUTHBEARER, only with a token the tokenServer considers valid.
type oauthUpstream struct {
	*smtptest.Server
	ts *tokenServer

	mu        sync.Mutex
	rejectAll bool
	attempts  []authAttempt
}

func startOAuthUpstream(t *testing.T, ts *tokenServer, mechs ...string) *oauthUpstream {
	u := &oauthUpstream{ts: ts}
	u.Server = smtptest.Start(t, smtptest.Options{
		AuthMechanisms: mechs,
		AuthServer: func(mech string, authenticated func(string)) sasl.Server {
			switch mech {
			case xoauth2Mech:
				return &xoauth2Server{check: func(user, token string) bool {
					return u.check(mech, user, token, authenticated)
				}}
			case sasl.OAuthBearer:
				return sasl.NewOAuthBearerServer(func(o sasl.OAuthBearerOptions) *sasl.OAuthBearerError {
					if u.check(mech, o.Username, o.Token, authenticated) {
						return nil
					}
					return &sasl.OAuthBearerError{Status: "invalid_token", Schemes: "bearer"}
				})
			}
			t.Errorf("AUTH %s", mech)
			return nil
		},
	})
	return u
}

func (u *oauthUpstream) check(mech, user, token string, authenticated func(string)) bool {
	ok := user == upUser && u.ts.valid(token)
	u.ts.mu.Lock()
	exp, issued := u.ts.expiry[token]
	u.ts.mu.Unlock()
	u.mu.Lock()
	ok = ok && !u.rejectAll
	u.attempts = append(u.attempts, authAttempt{mech: mech, user: user, ok: ok,
		expired: issued && !u.ts.clock.Now().Before(exp)})
	u.mu.Unlock()
	if ok {
		authenticated(user)
	}
	return ok
}

func (u *oauthUpstream) setRejectAll(v bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.rejectAll = v
}

func (u *oauthUpstream) auths() []authAttempt {
	u.mu.Lock()
	defer u.mu.Unlock()
	return slices.Clone(u.attempts)
}

// xoauth2Server is the server side of XOAUTH2 as Gmail speaks it: a bad
// token gets a 334 challenge with a JSON status, and after the client's
// empty response a 535.
type xoauth2Server struct {
	check  func(user, token string) bool
	failed bool
}

func (s *xoauth2Server) Next(response []byte) ([]byte, bool, error) {
	if s.failed {
		if len(response) != 0 {
			return nil, true, &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 2}, Message: "expected an empty response"}
		}
		return nil, true, &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "Username and Password not accepted"}
	}
	if response == nil {
		return []byte{}, false, nil
	}
	fields := strings.Split(string(response), "\x01")
	if len(fields) != 4 || fields[2] != "" || fields[3] != "" ||
		!strings.HasPrefix(fields[0], "user=") || !strings.HasPrefix(fields[1], "auth=Bearer ") {
		return nil, true, &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 2}, Message: "malformed XOAUTH2 response"}
	}
	if s.check(strings.TrimPrefix(fields[0], "user="), strings.TrimPrefix(fields[1], "auth=Bearer ")) {
		return nil, true, nil
	}
	s.failed = true
	return []byte(`{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}`), false, nil
}

// oauthEnv is a Deliverer with one OAuth2 upstream "oauth" that opens a
// new connection, and so authenticates, for every delivery.
type oauthEnv struct {
	*deliverEnv
	clock *fakeClock
	ts    *tokenServer
	up    *oauthUpstream
}

// newOAuthEnv starts a token server and an upstream offering mechs; cfg
// completes the upstream's OAuth (TokenURL and Client are filled in).
func newOAuthEnv(t *testing.T, mode AuthMode, cfg OAuth, mechs ...string) *oauthEnv {
	t.Helper()
	clock := &fakeClock{now: time.Now()}
	ts := startTokenServer(t, clock)
	up := startOAuthUpstream(t, ts, mechs...)
	if cfg.TokenURL == "" {
		cfg.TokenURL = ts.URL()
	}
	cfg.Client = ts.srv.Client()
	env := newDeliverer(t, Upstream{Name: "oauth", Address: up.Addr(), TLS: mailproto.TLSNone,
		Username: upUser, Auth: mode, OAuth: &cfg})
	env.d.Now = clock.Now
	env.d.Logger = slog.New(slog.NewTextHandler(env.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	// Without idle connections every delivery logs in afresh.
	env.d.Close()
	return &oauthEnv{deliverEnv: env, clock: clock, ts: ts, up: up}
}

func refreshFlow() OAuth {
	return OAuth{ClientID: oauthClientID, ClientSecret: oauthClientSecret, RefreshToken: oauthRefreshToken}
}

// deliverOne delivers one message to one recipient and returns its result.
func (e *oauthEnv) deliverOne(t *testing.T, rcpt string) queue.Result {
	t.Helper()
	return deliver(t, e.d, testMessage("app@example.com", rcpt), deliverBody)[0]
}

// checkNoSecrets fails if a token, the refresh token or the client secret
// appears in the logs or in texts, such as replies and error strings.
func (e *oauthEnv) checkNoSecrets(t *testing.T, texts ...string) {
	t.Helper()
	all := e.log.String() + "\n" + strings.Join(texts, "\n")
	secrets := append([]string{oauthClientSecret, oauthRefreshToken}, e.ts.tokens()...)
	for _, s := range secrets {
		if strings.Contains(all, s) {
			t.Errorf("secret %q appears in the logs or results:\n%s", s, all)
		}
	}
	// Not even a part of one: the random half of the access tokens.
	for _, s := range e.ts.tokens() {
		if strings.Contains(all, strings.TrimPrefix(s, "ya29.access-")[:16]) {
			t.Errorf("part of token %q appears in the logs or results", s)
		}
	}
}

func replies(rs ...queue.Result) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Reply)
	}
	return out
}

func TestXOAUTH2Client(t *testing.T) {
	c := &xoauth2Client{username: "relay@example.com", token: "tok"}
	mech, ir, err := c.Start()
	if err != nil || mech != "XOAUTH2" || string(ir) != "user=relay@example.com\x01auth=Bearer tok\x01\x01" {
		t.Errorf("Start = %q, %q, %v", mech, ir, err)
	}
	resp, err := c.Next([]byte(`{"status":"401","schemes":"Bearer"}`))
	if err != nil || resp == nil || len(resp) != 0 {
		t.Errorf("Next(error status) = %q (nil %v), %v; want an empty response", resp, resp == nil, err)
	}
	if _, err := c.Next([]byte(`{}`)); err == nil {
		t.Errorf("a second challenge was answered")
	}
	for _, bad := range []*xoauth2Client{{username: "a\x01auth=Bearer x", token: "t"}, {username: "u", token: "t\x01"}} {
		if _, _, err := bad.Start(); err == nil {
			t.Errorf("Start accepted %q / %q", bad.username, bad.token)
		}
	}
}

func TestDeliverOAuthRefreshToken(t *testing.T) {
	e := newOAuthEnv(t, "", refreshFlow(), "XOAUTH2")

	r1 := e.deliverOne(t, "a@example.net")
	checkResult(t, r1, "a@example.net", queue.Delivered, "250 ", "oauth")
	msgs := e.up.WaitMessages(t, 1, 5*time.Second)
	if msgs[0].AuthUser != upUser {
		t.Errorf("message authenticated as %q", msgs[0].AuthUser)
	}
	// The token is cached: the next delivery, a new connection, uses it.
	r2 := e.deliverOne(t, "b@example.net")
	checkResult(t, r2, "b@example.net", queue.Delivered, "250 ", "oauth")
	if got := e.ts.requests(); !slices.Equal(got, []string{"refresh_token"}) {
		t.Errorf("token requests %q, want one refresh", got)
	}
	auths := e.up.auths()
	if len(auths) != 2 || !auths[0].ok || !auths[1].ok || auths[0].mech != "XOAUTH2" {
		t.Errorf("AUTH attempts %+v, want two good XOAUTH2", auths)
	}
	st := stateOf(t, e.d, "oauth")
	if exp := e.ts.expiry[e.ts.tokens()[0]]; st.TokenExpiry.Before(exp.Add(-time.Minute)) || st.TokenExpiry.After(time.Now().Add(time.Hour+time.Minute)) {
		t.Errorf("TokenExpiry %v, token issued for an hour from %v", st.TokenExpiry, exp.Add(-time.Hour))
	}
	e.checkNoSecrets(t, replies(r1, r2)...)
}

// TestDeliverOAuthShortTokenRefreshedFirst: a 2-second token is used while
// it lasts; once it has expired, the next delivery fetches a new one before
// AUTH, so that the upstream never sees an expired token.
func TestDeliverOAuthShortTokenRefreshedFirst(t *testing.T) {
	e := newOAuthEnv(t, "", refreshFlow(), "XOAUTH2")
	e.ts.setExpiresIn(2)

	checkResult(t, e.deliverOne(t, "a@example.net"), "a@example.net", queue.Delivered, "250 ", "oauth")
	checkResult(t, e.deliverOne(t, "b@example.net"), "b@example.net", queue.Delivered, "250 ", "oauth")
	if got := len(e.ts.requests()); got != 1 {
		t.Fatalf("%d token requests within the token's lifetime, want 1", got)
	}
	e.clock.Advance(3 * time.Second)
	checkResult(t, e.deliverOne(t, "c@example.net"), "c@example.net", queue.Delivered, "250 ", "oauth")
	if got := len(e.ts.requests()); got != 2 {
		t.Errorf("%d token requests after expiry, want 2", got)
	}
	for _, a := range e.up.auths() {
		if !a.ok || a.expired {
			t.Errorf("upstream saw %+v", a)
		}
	}
	if got := len(e.up.auths()); got != 3 {
		t.Errorf("%d AUTH attempts, want 3", got)
	}
}

// TestDeliverOAuthRevokedToken: a token revoked before it expires is
// refused; the relay drops it, fetches one new token and retries on a new
// connection.
func TestDeliverOAuthRevokedToken(t *testing.T) {
	for _, mech := range []string{"XOAUTH2", sasl.OAuthBearer} {
		t.Run(mech, func(t *testing.T) {
			e := newOAuthEnv(t, AuthMode(strings.ToLower(mech)), refreshFlow(), "XOAUTH2", sasl.OAuthBearer)
			checkResult(t, e.deliverOne(t, "a@example.net"), "a@example.net", queue.Delivered, "250 ", "oauth")
			e.ts.revokeAll()
			conns := e.up.Connections()

			r := e.deliverOne(t, "b@example.net")
			checkResult(t, r, "b@example.net", queue.Delivered, "250 ", "oauth")
			if got := len(e.ts.requests()); got != 2 {
				t.Errorf("%d token requests, want 2", got)
			}
			auths := e.up.auths()
			if len(auths) != 3 || !auths[0].ok || auths[1].ok || !auths[2].ok {
				t.Errorf("AUTH attempts %+v, want good, refused, good", auths)
			}
			for _, a := range auths {
				if a.mech != mech {
					t.Errorf("AUTH %s, want %s", a.mech, mech)
				}
			}
			if got := e.up.Connections() - conns; got != 2 {
				t.Errorf("%d connections for the retried delivery, want 2", got)
			}
			if st := stateOf(t, e.d, "oauth"); !st.Up || st.Failures != 0 {
				t.Errorf("upstream state %+v after a successful retry", st)
			}
			if !strings.Contains(e.log.String(), "upstream refused oauth2 token, retrying") {
				t.Errorf("retry not logged:\n%s", e.log)
			}
			e.checkNoSecrets(t, r.Reply)
		})
	}
}

// TestDeliverOAuthRefusedAfterRefresh: an upstream that refuses the new
// token too defers the message (never a bounce) and is marked down as for
// any refused AUTH; the token endpoint is asked exactly twice.
func TestDeliverOAuthRefusedAfterRefresh(t *testing.T) {
	for _, mech := range []string{"XOAUTH2", sasl.OAuthBearer} {
		t.Run(mech, func(t *testing.T) {
			e := newOAuthEnv(t, "", refreshFlow(), mech)
			e.up.setRejectAll(true)

			r := e.deliverOne(t, "a@example.net")
			if r.State != queue.Pending || r.Upstream != "oauth" || !r.NotBefore.IsZero() {
				t.Errorf("result %+v, want pending for a retry with backoff", r)
			}
			if mech == "XOAUTH2" && !strings.HasPrefix(r.Reply, "535 5.7.8 ") {
				t.Errorf("reply %q, want the upstream's 535", r.Reply)
			}
			if mech == sasl.OAuthBearer && !strings.Contains(r.Reply, "invalid_token") {
				t.Errorf("reply %q, want the OAUTHBEARER status", r.Reply)
			}
			if got := e.ts.requests(); len(got) != 2 {
				t.Errorf("token requests %q, want exactly 2", got)
			}
			if got := len(e.up.auths()); got != 2 {
				t.Errorf("%d AUTH attempts, want 2", got)
			}
			st := stateOf(t, e.d, "oauth")
			if st.Up || st.Failures != 1 || st.DownUntil.IsZero() {
				t.Errorf("upstream state %+v, want down after one refusal", st)
			}
			// Down: the next delivery leaves it out without a token request.
			r2 := e.deliverOne(t, "b@example.net")
			if r2.State != queue.Pending {
				t.Errorf("second result %+v", r2)
			}
			if got := len(e.ts.requests()); got != 2 {
				t.Errorf("%d token requests after the upstream went down", got)
			}
			if len(e.up.Messages()) != 0 {
				t.Errorf("upstream took a message")
			}
			e.checkNoSecrets(t, r.Reply, r2.Reply)
		})
	}
}

// TestDeliverOAuthMechanismChoice: OAUTHBEARER where offered, else XOAUTH2,
// unless the configuration names one.
func TestDeliverOAuthMechanismChoice(t *testing.T) {
	tests := []struct {
		mode    AuthMode
		offered []string
		want    string // "" for none usable
	}{
		{"", []string{"XOAUTH2", sasl.OAuthBearer}, sasl.OAuthBearer},
		{AuthOAuth2, []string{"XOAUTH2"}, "XOAUTH2"},
		{AuthXOAUTH2, []string{sasl.OAuthBearer, "XOAUTH2"}, "XOAUTH2"},
		{AuthOAuthBearer, []string{"XOAUTH2", sasl.OAuthBearer}, sasl.OAuthBearer},
		{AuthOAuthBearer, []string{"XOAUTH2"}, ""},
		{"", []string{sasl.Plain}, ""},
	}
	for _, tt := range tests {
		t.Run(fmt.Sprintf("%s/%s", cmpOrDefault(string(tt.mode)), strings.Join(tt.offered, "+")), func(t *testing.T) {
			e := newOAuthEnv(t, tt.mode, refreshFlow(), tt.offered...)
			r := e.deliverOne(t, "a@example.net")
			if tt.want == "" {
				if r.State != queue.Pending || !strings.Contains(r.Reply, "no usable AUTH") {
					t.Errorf("result %+v, want pending: no usable AUTH", r)
				}
				if st := stateOf(t, e.d, "oauth"); st.Up {
					t.Errorf("upstream without a usable mechanism still up")
				}
				if n := len(e.ts.requests()); n != 0 {
					t.Errorf("%d token requests for an upstream we cannot log in to", n)
				}
				return
			}
			checkResult(t, r, "a@example.net", queue.Delivered, "250 ", "oauth")
			if a := e.up.auths(); len(a) != 1 || a[0].mech != tt.want {
				t.Errorf("AUTH attempts %+v, want one %s", a, tt.want)
			}
		})
	}
}

func cmpOrDefault(s string) string {
	if s == "" {
		return "default"
	}
	return s
}

// serviceAccountKey writes a Google-style JSON key for a new RSA key whose
// token_uri is tokenURL, and returns it with the public key.
func serviceAccountKey(t *testing.T, tokenURL string) ([]byte, *rsa.PublicKey) {
	t.Helper()
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	data, err := json.Marshal(map[string]string{
		"type":           "service_account",
		"project_id":     "project",
		"private_key_id": "key-1",
		"private_key":    string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})),
		"client_email":   saEmail,
		"client_id":      "1234567890",
		"token_uri":      tokenURL,
	})
	if err != nil {
		t.Fatal(err)
	}
	return data, &k.PublicKey
}

// TestDeliverOAuthServiceAccount: a Google service account signs a JWT for
// the delegated user; the token endpoint is the key's token_uri.
func TestDeliverOAuthServiceAccount(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	ts := startTokenServer(t, clock)
	keyJSON, pub := serviceAccountKey(t, ts.URL())
	ts.saKey = pub
	sa, err := ParseServiceAccount(keyJSON)
	if err != nil {
		t.Fatal(err)
	}
	if sa.ClientEmail != saEmail || sa.TokenURI != ts.URL() || sa.PrivateKeyID != "key-1" {
		t.Fatalf("parsed %+v", sa)
	}
	up := startOAuthUpstream(t, ts, "XOAUTH2")

	newEnv := func(subject string) *oauthEnv {
		env := newDeliverer(t, Upstream{Name: "oauth", Address: up.Addr(), TLS: mailproto.TLSNone, Username: upUser,
			OAuth: &OAuth{ServiceAccount: sa, Subject: subject, Client: ts.srv.Client()}})
		env.d.Now = clock.Now
		env.d.Close()
		return &oauthEnv{deliverEnv: env, clock: clock, ts: ts, up: up}
	}

	e := newEnv(upUser)
	r := e.deliverOne(t, "a@example.net")
	checkResult(t, r, "a@example.net", queue.Delivered, "250 ", "oauth")
	if got := ts.requests(); !slices.Equal(got, []string{"urn:ietf:params:oauth:grant-type:jwt-bearer"}) {
		t.Errorf("token requests %q", got)
	}
	e.checkNoSecrets(t, r.Reply)

	// A user the delegation does not cover: the grant is refused, the
	// message deferred and the upstream left out as misconfigured.
	e = newEnv("someone-else@example.com")
	r = e.deliverOne(t, "b@example.net")
	if r.State != queue.Pending || !strings.Contains(r.Reply, "invalid_grant") {
		t.Errorf("result %+v, want pending with invalid_grant", r)
	}
	if st := stateOf(t, e.d, "oauth"); st.Up {
		t.Errorf("upstream up after the grant was refused")
	}
}

func TestDeliverOAuthClientCredentials(t *testing.T) {
	e := newOAuthEnv(t, AuthXOAUTH2, OAuth{ClientID: oauthClientID, ClientSecret: oauthClientSecret, ClientCredentials: true}, "XOAUTH2")
	r := e.deliverOne(t, "a@example.net")
	checkResult(t, r, "a@example.net", queue.Delivered, "250 ", "oauth")
	if got := e.ts.requests(); !slices.Equal(got, []string{"client_credentials"}) {
		t.Errorf("token requests %q", got)
	}
	e.checkNoSecrets(t, r.Reply)
}

// TestDeliverOAuthTokenEndpointDown: no token, no AUTH: the message is
// deferred, and the reply names neither the endpoint nor a secret.
func TestDeliverOAuthTokenEndpointDown(t *testing.T) {
	e := newOAuthEnv(t, "", refreshFlow(), "XOAUTH2")
	addr := e.ts.srv.Listener.Addr().String()
	e.ts.srv.Close()

	r := e.deliverOne(t, "a@example.net")
	if r.State != queue.Pending || !strings.HasPrefix(r.Reply, "auth: oauth2 token endpoint: ") || strings.Contains(r.Reply, addr) {
		t.Errorf("result %+v, want pending with a short token endpoint error", r)
	}
	if len(e.up.auths()) != 0 {
		t.Errorf("AUTH tried without a token")
	}
	// Reported down, since the message had no other way, but not left
	// out: one failure is not DownAfter in a row.
	if st := stateOf(t, e.d, "oauth"); st.State != StateDown || st.ConsecutiveFailures != 1 || !st.DownUntil.IsZero() {
		t.Errorf("state %+v: one failure, reported down and not left out", st)
	}
	e.checkNoSecrets(t, r.Reply)
}

// TestTokenCacheConcurrent: deliveries needing a token at once share one
// request.
func TestTokenCacheConcurrent(t *testing.T) {
	clock := &fakeClock{now: time.Now()}
	ts := startTokenServer(t, clock)
	o := refreshFlow()
	o.TokenURL, o.Client = ts.URL(), ts.srv.Client()
	d := NewDeliverer()
	d.Now, d.Logger = clock.Now, slog.New(slog.DiscardHandler)
	d.SetConfig(Config{Upstreams: []Upstream{{Name: "oauth", OAuth: &o}}})
	tokenCache := func() *tokenCache { return d.current().endpoints["oauth"].tokens }
	tc := tokenCache()
	if tokenCache() != tc {
		t.Fatal("a second cache for the same upstream")
	}

	var wg sync.WaitGroup
	got := make([]string, 16)
	for i := range got {
		wg.Go(func() {
			tok, err := tc.token(context.Background())
			if err != nil {
				t.Error(err)
			}
			got[i] = tok
		})
	}
	wg.Wait()
	if n := len(ts.requests()); n != 1 {
		t.Errorf("%d token requests, want 1", n)
	}
	for _, tok := range got {
		if tok != got[0] || !ts.valid(tok) {
			t.Errorf("tokens %q", got)
			break
		}
	}

	// A refused token is dropped once, however many saw it refused.
	tc.invalidate(got[0])
	tc.invalidate(got[0])
	fresh, err := tc.token(context.Background())
	if err != nil || fresh == got[0] {
		t.Fatalf("after invalidate: %q, %v", fresh, err)
	}
	tc.invalidate(got[0]) // stale: the new token stays
	if again, _ := tc.token(context.Background()); again != fresh || len(ts.requests()) != 2 {
		t.Errorf("a stale invalidate dropped the new token: %d requests", len(ts.requests()))
	}

	// A caller that gives up does not wait for the request.
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	tc.invalidate(fresh)
	if _, err := tc.token(ctx); err == nil {
		t.Errorf("token with a cancelled context succeeded")
	}
}

func TestParseServiceAccount(t *testing.T) {
	good, _ := serviceAccountKey(t, "https://oauth2.googleapis.com/token")
	var fields map[string]string
	if err := json.Unmarshal(good, &fields); err != nil {
		t.Fatal(err)
	}
	with := func(k, v string) []byte {
		m := map[string]string{}
		for k, v := range fields {
			m[k] = v
		}
		m[k] = v
		if v == "" {
			delete(m, k)
		}
		b, _ := json.Marshal(m)
		return b
	}
	_, edKey, _ := ed25519.GenerateKey(rand.Reader)
	edDER, _ := x509.MarshalPKCS8PrivateKey(edKey)
	edPEM := string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: edDER}))

	if _, err := ParseServiceAccount(good); err != nil {
		t.Errorf("good key: %v", err)
	}
	tests := []struct {
		name string
		data []byte
		want string
	}{
		{"not JSON", []byte("-----BEGIN PRIVATE KEY-----"), "not a service account JSON key"},
		{"authorized user", with("type", "authorized_user"), `"authorized_user"`},
		{"no email", with("client_email", ""), "client_email"},
		{"no token_uri", with("token_uri", ""), "token_uri"},
		{"no key", with("private_key", ""), "private_key"},
		{"key not PEM", with("private_key", "MIIE..."), "no PEM block"},
		{"key not RSA", with("private_key", edPEM), "not an RSA key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseServiceAccount(tt.data)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %v, want one containing %q", err, tt.want)
			}
			if err != nil && bytes.Contains([]byte(err.Error()), []byte("PRIVATE KEY")) {
				t.Errorf("error shows the key: %v", err)
			}
		})
	}
}

// TestDeliverOAuthTLS: XOAUTH2 over implicit TLS, as to smtp.gmail.com:465.
func TestDeliverOAuthTLS(t *testing.T) {
	pki := testpki.New(t)
	clock := &fakeClock{now: time.Now()}
	ts := startTokenServer(t, clock)
	var mu sync.Mutex
	var seen []string
	s := smtptest.Start(t, smtptest.Options{
		TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), AuthMechanisms: []string{"XOAUTH2"},
		AuthServer: func(mech string, authenticated func(string)) sasl.Server {
			return &xoauth2Server{check: func(user, token string) bool {
				mu.Lock()
				seen = append(seen, token)
				mu.Unlock()
				if ts.valid(token) {
					authenticated(user)
					return true
				}
				return false
			}}
		},
	})
	o := refreshFlow()
	o.TokenURL, o.Client = ts.URL(), ts.srv.Client()
	env := newDeliverer(t, Upstream{Name: "gmail", Address: s.Addr(), TLS: mailproto.TLSImplicit, RootCAs: pki.CAPool, Username: upUser, OAuth: &o})
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "gmail")
	if m := s.WaitMessages(t, 1, 5*time.Second); !m[0].TLS || m[0].AuthUser != upUser {
		t.Errorf("message %+v", m[0])
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(seen, ts.tokens()) {
		t.Errorf("upstream saw %q, server issued %q", seen, ts.tokens())
	}
}

// TestTokenError: failed token requests are described without the
// response body, the endpoint's URL or anything sent.
func TestTokenError(t *testing.T) {
	resp := &http.Response{Status: "400 Bad Request", StatusCode: 400}
	tests := []struct {
		name    string
		err     error
		want    string
		refused bool
	}{
		{"grant refused", &oauth2.RetrieveError{Response: resp, ErrorCode: "invalid_grant", ErrorDescription: "Token has been\nexpired or revoked.", Body: []byte(oauthRefreshToken)},
			"oauth2 token request refused: invalid_grant (Token has been expired or revoked.)", true},
		{"code in the body only", &oauth2.RetrieveError{Response: resp, Body: []byte(`{"error":"invalid_client","echo":"` + oauthClientSecret + `"}`)},
			"oauth2 token request refused: invalid_client", true},
		{"other code", &oauth2.RetrieveError{Response: resp, ErrorCode: "temporarily_unavailable"},
			"oauth2 token endpoint answered 400 Bad Request: temporarily_unavailable", false},
		{"no code", &oauth2.RetrieveError{Response: &http.Response{Status: "502 Bad Gateway"}, Body: []byte("<html>" + oauthRefreshToken)},
			"oauth2 token endpoint answered 502 Bad Gateway", false},
		{"transport", &url.Error{Op: "Post", URL: "https://login.example/tenant-secret/token", Err: &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}},
			"oauth2 token endpoint: connection refused", false},
		{"jwt transport", errors.New(`oauth2: cannot fetch token: Post "https://login.example/tenant/token": dial tcp 127.0.0.1:1: connect: connection refused`),
			"oauth2 token request failed: connection refused", false},
		{"deadline", fmt.Errorf("x: %w", context.DeadlineExceeded), "oauth2 token request: x: context deadline exceeded", false},
		{"description echoes the request", &oauth2.RetrieveError{Response: resp, ErrorCode: "invalid_grant",
			ErrorDescription: "bad grant_type=refresh_token&refresh_token=" + url.QueryEscape(oauthRefreshToken) + "&client_secret=" + oauthClientSecret},
			"oauth2 token request refused: invalid_grant (bad grant_type=refresh_token&refresh_token=[redacted]&client_secret=[redacted])", true},
		{"code echoes a secret", &oauth2.RetrieveError{Response: resp, ErrorCode: "bad " + oauthClientSecret},
			"oauth2 token endpoint answered 400 Bad Request: bad [redacted]", false},
		{"secret across the cut", &oauth2.RetrieveError{Response: resp, ErrorCode: "invalid_client", ErrorDescription: strings.Repeat("x", 190) + oauthClientSecret},
			"oauth2 token request refused: invalid_client (" + strings.Repeat("x", 190) + "[redacted])", true},
		{"jwt flow text", errors.New("oauth2: cannot fetch token: 400 Bad Request\nResponse: " + oauthRefreshToken),
			"oauth2 token request failed: cannot fetch token: 400 Bad Request Response: [redacted]", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tokenError(tt.err, redactor([]string{oauthClientSecret, oauthRefreshToken}))
			if err.Error() != tt.want {
				t.Errorf("got %q, want %q", err, tt.want)
			}
			if errors.Is(err, errGrantRefused) != tt.refused || authRefused(err) != tt.refused {
				t.Errorf("refused = %v, want %v", errors.Is(err, errGrantRefused), tt.refused)
			}
		})
	}
}

// TestOAuthPrintsNoSecrets: an Upstream printed whole shows no secret of
// its OAuth.
func TestOAuthPrintsNoSecrets(t *testing.T) {
	keyJSON, _ := serviceAccountKey(t, "https://oauth2.googleapis.com/token")
	sa, err := ParseServiceAccount(keyJSON)
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range []*OAuth{
		{ClientID: oauthClientID, ClientSecret: oauthClientSecret, RefreshToken: oauthRefreshToken, TokenURL: "https://t.example/token"},
		{ServiceAccount: sa, Subject: upUser},
		{ClientID: oauthClientID, ClientSecret: oauthClientSecret, ClientCredentials: true},
	} {
		up := Upstream{Name: "u", Username: upUser, OAuth: o}
		for _, format := range []string{"%v", "%+v", "%#v", "%s"} {
			text := fmt.Sprintf(format, up)
			for _, secret := range []string{oauthClientSecret, oauthRefreshToken, "PRIVATE KEY"} {
				if strings.Contains(text, secret) {
					t.Errorf("%s shows %q: %s", format, secret, text)
				}
			}
			if !strings.Contains(text, "OAuth2 ") {
				t.Errorf("%s does not describe the OAuth: %s", format, text)
			}
		}
	}
}
