package upstream

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"log/slog"
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

	"smarthost/internal/mailproto"
	"smarthost/internal/smtptest"
	"smarthost/queue"
)

// echoTokenServer is a careless OAuth2 token endpoint: it issues access
// tokens and rotates the refresh token with each, and while refusing is
// set it refuses the grant with an error_description that repeats what
// the relay sent it.
type echoTokenServer struct {
	srv *httptest.Server

	mu       sync.Mutex
	refusing bool
	refresh  string   // the refresh token it accepts now
	issued   []string // access tokens and rotated refresh tokens
}

func startEchoTokenServer(t *testing.T) *echoTokenServer {
	ts := &echoTokenServer{refresh: oauthRefreshToken}
	ts.srv = httptest.NewTLSServer(http.HandlerFunc(ts.serve))
	t.Cleanup(ts.srv.Close)
	return ts
}

func (ts *echoTokenServer) serve(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	f := r.PostForm
	ts.mu.Lock()
	defer ts.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	if ts.refusing || f.Get("refresh_token") != ts.refresh || f.Get("client_secret") != oauthClientSecret {
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(map[string]string{
			"error": "invalid_grant",
			"error_description": "refresh token " + f.Get("refresh_token") + " of client " + f.Get("client_id") +
				" with secret " + f.Get("client_secret") + " refused; request was " + f.Encode(),
		})
		return
	}
	access, refresh := "ya29.echo-"+randomHex(), "1//rotated-"+randomHex()
	ts.issued = append(ts.issued, access, refresh)
	ts.refresh = refresh
	json.NewEncoder(w).Encode(map[string]any{"access_token": access, "token_type": "Bearer", "expires_in": 3600, "refresh_token": refresh})
}

func (ts *echoTokenServer) setRefusing(v bool) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	ts.refusing = v
}

func (ts *echoTokenServer) valid(token string) bool {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return slices.Contains(ts.issued, token)
}

func (ts *echoTokenServer) tokens() []string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return slices.Clone(ts.issued)
}

func randomHex() string {
	b := make([]byte, 12)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// echoUpstream is a go-smtp upstream that repeats the credentials of the
// last login in its refusals: a 535 that names the password it was sent
// (and the PLAIN response it came in), and a 451 to every RCPT that names
// the password or the OAuth2 token the session logged in with.
type echoUpstream struct {
	*smtptest.Server

	mu       sync.Mutex
	refusing bool
	last     string // the password or token of the last login
}

func startEchoUpstream(t *testing.T, mech string, valid func(string) bool) *echoUpstream {
	u := &echoUpstream{}
	u.Server = smtptest.Start(t, smtptest.Options{
		AuthMechanisms: []string{mech},
		AuthServer: func(mech string, authenticated func(string)) sasl.Server {
			if mech == sasl.Plain {
				return sasl.NewPlainServer(func(identity, user, pass string) error {
					u.mu.Lock()
					defer u.mu.Unlock()
					u.last = pass
					if u.refusing || !valid(pass) {
						blob := base64.StdEncoding.EncodeToString([]byte(identity + "\x00" + user + "\x00" + pass))
						return &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8},
							Message: "password " + pass + " refused for " + user + " (AUTH PLAIN " + blob + ")"}
					}
					authenticated(user)
					return nil
				})
			}
			return &xoauth2Server{check: func(user, token string) bool {
				u.mu.Lock()
				defer u.mu.Unlock()
				u.last = token
				if valid(token) {
					authenticated(user)
					return true
				}
				return false
			}}
		},
		RcptReply: func(to string) *smtp.SMTPError {
			u.mu.Lock()
			defer u.mu.Unlock()
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 0},
				Message: "credential " + u.last + " may not send to " + to + " now"}
		},
	})
	return u
}

func (u *echoUpstream) setRefusing(v bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.refusing = v
}

// TestDeliverRedactsEchoedSecrets: an upstream that repeats the password
// or the access token it was sent, and a token endpoint that repeats the
// refresh token (the configured one, and each it rotated to) and the
// client secret, over real sockets. None of it reaches the recipients'
// replies that the queue stores, the debug log, the upstreams' states or
// a DSN built from the replies.
func TestDeliverRedactsEchoedSecrets(t *testing.T) {
	ts := startEchoTokenServer(t)
	oauthUp := startEchoUpstream(t, xoauth2Mech, ts.valid)
	passUp := startEchoUpstream(t, sasl.Plain, func(pass string) bool { return pass == upPass })

	clock := &fakeClock{now: time.Now()}
	env := newDeliverer(t,
		Upstream{Name: "pass", Address: passUp.Addr(), TLS: mailproto.TLSNone, Username: upUser, Password: upPass},
		Upstream{Name: "oauth", Address: oauthUp.Addr(), TLS: mailproto.TLSNone, Username: upUser, Auth: AuthXOAUTH2,
			OAuth: &OAuth{ClientID: oauthClientID, ClientSecret: oauthClientSecret, RefreshToken: oauthRefreshToken,
				TokenURL: ts.srv.URL + "/token", Client: ts.srv.Client()}},
	)
	d := env.d
	setRoutes(d, Route{FromDomain: "pass.example", Upstreams: []string{"pass"}}, Route{FromDomain: "oauth.example", Upstreams: []string{"oauth"}})
	d.Now = clock.Now
	d.Logger = slog.New(slog.NewTextHandler(env.log, &slog.HandlerOptions{Level: slog.LevelDebug}))
	d.Close() // no idle connections: every delivery logs in afresh

	var results []queue.Result
	step := func(from, wantReply string) {
		t.Helper()
		r := deliver(t, d, testMessage(from, "x@example.net"), deliverBody)[0]
		if r.State != queue.Pending || !strings.Contains(r.Reply, wantReply) || !strings.Contains(r.Reply, redacted) {
			t.Errorf("from %s: reply %q, want it to hold %q and %s", from, r.Reply, wantReply, redacted)
		}
		results = append(results, r)
		// Past any upstream's down time and any token's expiry.
		clock.Advance(2 * time.Hour)
	}

	// The upstream repeats the password after a good login, then in its
	// 535 with the PLAIN response that carried it.
	step("app@pass.example", "451 4.7.0 credential "+redacted+" may not send")
	passUp.setRefusing(true)
	step("app@pass.example", "535 5.7.8 password "+redacted+" refused for "+upUser+" (AUTH PLAIN "+redacted+")")
	// The token endpoint repeats the configured refresh token and the
	// client secret; then a token is issued and the refresh token
	// rotated, and the upstream repeats the access token; then the
	// endpoint repeats the rotated refresh token, and a second access
	// token is repeated.
	ts.setRefusing(true)
	step("app@oauth.example", "oauth2 token request refused: invalid_grant (refresh token "+redacted+" of client "+oauthClientID+" with secret "+redacted)
	ts.setRefusing(false)
	step("app@oauth.example", "451 4.7.0 credential "+redacted+" may not send")
	ts.setRefusing(true)
	step("app@oauth.example", "oauth2 token request refused: invalid_grant (refresh token "+redacted)
	ts.setRefusing(false)
	step("app@oauth.example", "451 4.7.0 credential "+redacted+" may not send")

	issued := ts.tokens()
	if len(issued) != 4 {
		t.Fatalf("the token endpoint issued %d tokens, want 2 access and 2 refresh: %q", len(issued), issued)
	}
	secrets := append([]string{
		upPass, base64.StdEncoding.EncodeToString([]byte("\x00" + upUser + "\x00" + upPass)),
		oauthClientSecret, url.QueryEscape(oauthClientSecret), oauthRefreshToken, url.QueryEscape(oauthRefreshToken),
	}, issued...)
	for _, tok := range issued {
		secrets = append(secrets, url.QueryEscape(tok), tok[len(tok)-24:]) // not even the random part
	}

	states, err := json.Marshal(d.UpstreamStates())
	if err != nil {
		t.Fatal(err)
	}
	b := &Bouncer{Hostname: "relay.test"}
	m := testMessage("app@example.com", "x@example.net")
	var dsns []string
	for _, r := range results {
		_, dsn := b.Bounce(queue.BounceFailed, m, []queue.Recipient{{Addr: r.Rcpt, State: r.State, Reply: r.Reply, Upstream: r.Upstream}}, queue.NewBody([]byte(deliverBody)))
		dsns = append(dsns, string(dsn))
	}
	for name, text := range map[string]string{
		"replies":         strings.Join(replies(results...), "\n"),
		"debug log":       env.log.String(),
		"upstream states": string(states),
		"DSNs":            strings.Join(dsns, "\n"),
	} {
		for _, s := range secrets {
			if strings.Contains(text, s) {
				t.Errorf("%s show secret %q:\n%s", name, s, text)
			}
		}
	}
	if !strings.Contains(string(states), "last_error\":\"535 5.7.8 password "+redacted) {
		t.Errorf("upstream states do not show the redacted refusal: %s", states)
	}
}

// TestCheckUpstreamRedactsEchoedSecrets: check-upstream's report of an
// upstream that repeats the password, after a good login and in its 535,
// shows the replies without it.
func TestCheckUpstreamRedactsEchoedSecrets(t *testing.T) {
	srv := startEchoUpstream(t, sasl.Plain, func(pass string) bool { return pass == upPass })
	up := Upstream{Name: "echo", Address: srv.Addr(), TLS: mailproto.TLSNone, Username: upUser, Password: upPass}
	for _, refusing := range []bool{false, true} {
		srv.setRefusing(refusing)
		rep := Check(context.Background(), up, CheckOptions{Recipient: "someone@example.net", Timeout: 10 * time.Second})
		text, err := json.Marshal(rep)
		if err != nil {
			t.Fatal(err)
		}
		if rep.Verdict != VerdictFail || !strings.Contains(rep.Problem, redacted) {
			t.Errorf("refusing %v: verdict %s, problem %q, want a failure with the reply redacted", refusing, rep.Verdict, rep.Problem)
		}
		for _, s := range []string{upPass, base64.StdEncoding.EncodeToString([]byte("\x00" + upUser + "\x00" + upPass))} {
			if strings.Contains(string(text), s) {
				t.Errorf("refusing %v: the report shows %q: %s", refusing, s, text)
			}
		}
	}
}

// TestRedactorForms: each form in which a text may repeat a secret of an
// upstream's configuration is redacted, and nothing else.
func TestRedactorForms(t *testing.T) {
	keyJSON, _ := serviceAccountKey(t, "https://oauth2.googleapis.com/token")
	sa, err := ParseServiceAccount(keyJSON)
	if err != nil {
		t.Fatal(err)
	}
	keyLines := strings.Split(strings.TrimSpace(string(sa.PrivateKey)), "\n")
	escapedKey, _ := json.Marshal(string(sa.PrivateKey))
	red := redactor(upstreamSecrets(&Upstream{Username: upUser, Password: "pass  word\twith spaces",
		OAuth: &OAuth{ClientSecret: oauthClientSecret, RefreshToken: oauthRefreshToken, ServiceAccount: sa}}))
	for in, want := range map[string]string{
		"535 bad pass  word\twith spaces":                                                                 "535 bad [redacted]",
		"535 bad pass word with spaces":                                                                   "535 bad [redacted]",
		"LOGIN " + base64.StdEncoding.EncodeToString([]byte("pass  word\twith spaces")):                   "LOGIN [redacted]",
		"PLAIN " + base64.StdEncoding.EncodeToString([]byte("\x00"+upUser+"\x00pass  word\twith spaces")): "PLAIN [redacted]",
		"refresh_token=" + url.QueryEscape(oauthRefreshToken) + "&x=1":                                    "refresh_token=[redacted]&x=1",
		"secret " + oauthClientSecret + "2":                                                               "secret [redacted]2",
		"key line " + keyLines[1] + " seen":                                                               "key line [redacted] seen",
		"250 2.0.0 OK queued":                                                                             "250 2.0.0 OK queued",
	} {
		if got := red.Replace(in); got != want {
			t.Errorf("%q: got %q, want %q", in, got, want)
		}
	}
	// The key JSON-escaped, as an endpoint that repeats the request body
	// would show it: no line of its body is left.
	got := red.Replace(string(escapedKey))
	for _, line := range keyLines[1 : len(keyLines)-2] {
		if strings.Contains(got, line) {
			t.Errorf("key line %q left in %s", line, got)
		}
	}
}
