package e2e

import (
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

const (
	e2eClientSecret = "e2e-client-secret-GOCSPX-4711"
	e2eRefreshToken = "1//e2e-refresh-token-0815"
)

// TestEchoedSecretsNotPassedOn: an upstream whose refusal repeats the
// relay's password, a token endpoint whose error_description repeats the
// refresh token and the client secret, and an upstream that repeats the
// access token. Whatever they say reaches the debug log, the queue's
// stored replies as GET /api/queue shows them, and the DSNs at expiry
// only with the secrets redacted.
func TestEchoedSecretsNotPassedOn(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
		if to == "slow@example.net" {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 2}, Message: "quota of " + upUser + " with password " + upPassword + " exceeded"}
		}
		return nil
	}})

	var (
		mu       sync.Mutex
		refusing = true
		issued   []string
		last     string // the token of the oauth upstream's last login
	)
	tokens := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		mu.Lock()
		defer mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		if refusing {
			w.WriteHeader(http.StatusBadRequest)
			json.NewEncoder(w).Encode(map[string]string{"error": "invalid_grant",
				"error_description": "refresh_token " + r.PostForm.Get("refresh_token") + " with client_secret " + r.PostForm.Get("client_secret") + " refused"})
			return
		}
		tok := "ya29.e2e-" + rand.Text()
		issued = append(issued, tok)
		json.NewEncoder(w).Encode(map[string]any{"access_token": tok, "token_type": "Bearer", "expires_in": 3600})
	}))
	t.Cleanup(tokens.Close)
	oauthUp := smtptest.Start(t, smtptest.Options{
		AuthMechanisms: []string{sasl.OAuthBearer},
		AuthServer: func(mech string, authenticated func(string)) sasl.Server {
			return sasl.NewOAuthBearerServer(func(o sasl.OAuthBearerOptions) *sasl.OAuthBearerError {
				mu.Lock()
				defer mu.Unlock()
				if !slices.Contains(issued, o.Token) {
					return &sasl.OAuthBearerError{Status: "invalid_token", Schemes: "bearer"}
				}
				last = o.Token
				authenticated(o.Username)
				return nil
			})
		},
		RcptReply: func(to string) *smtp.SMTPError {
			if to != "r@example.net" {
				return nil
			}
			mu.Lock()
			defer mu.Unlock()
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "token " + last + " may not send now"}
		},
	})

	dir := t.TempDir()
	secretFile, refreshFile := filepath.Join(dir, "client-secret"), filepath.Join(dir, "refresh-token")
	os.WriteFile(secretFile, []byte(e2eClientSecret+"\n"), 0o600)
	os.WriteFile(refreshFile, []byte(e2eRefreshToken+"\n"), 0o600)
	r := startRelay(t, writeConfig(t, relayConfig{Dir: dir, PKI: pki, UpstreamAddr: up.Addr(), MaxAge: "6s",
		AllowedFrom: []string{"*@example.com", "*@oauth.example"}, Extra: `
[[upstream]]
name = "oauth"
address = "` + oauthUp.Addr() + `"
tls = "none"
username = "relay@oauth.example"
auth = "oauthbearer"
oauth_token_url = "` + tokens.URL + `/token"
oauth_client_id = "e2e-client"
oauth_client_secret_file = "` + secretFile + `"
oauth_refresh_token_file = "` + refreshFile + `"

[[route]]
from_domain = "oauth.example"
upstreams = ["oauth"]
`}))

	s := connect(t, r.addr, pki)
	defer s.close()
	slow, err := s.send("app@example.com", []string{"slow@example.net"}, testMsg)
	if err != nil {
		t.Fatal(err)
	}
	viaOAuth, err := s.send("app@oauth.example", []string{"r@example.net"}, strings.ReplaceAll(testMsg, "app@example.com", "app@oauth.example"))
	if err != nil {
		t.Fatal(err)
	}

	// rawAPI returns the admin API's answer to GET path as it is sent.
	rawAPI := func(path string) string {
		t.Helper()
		req, _ := http.NewRequest("GET", r.http+path, nil)
		req.Header.Set("Authorization", "Bearer "+adminToken)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body)
	}
	type entry struct {
		LastReply  string `json:"last_reply"`
		Recipients []struct {
			Reply string `json:"reply"`
		} `json:"recipients"`
	}
	var answers []string
	testwait.For(t, 30*time.Second, "both messages' first replies", func() bool {
		var e1, e2 entry
		a1, a2 := rawAPI("/api/queue/"+slow), rawAPI("/api/queue/"+viaOAuth)
		json.Unmarshal([]byte(a1), &e1)
		json.Unmarshal([]byte(a2), &e2)
		if !strings.HasPrefix(e1.LastReply, "451 4.2.2 quota") || !strings.Contains(e2.LastReply, "oauth2 token request refused") {
			return false
		}
		answers = append(answers, a1, a2, rawAPI("/api/queue"), rawAPI("/api/upstreams"))
		return true
	})
	for _, want := range []string{
		`"last_reply": "451 4.2.2 quota of relay@example.com with password [redacted] exceeded"`,
		`"reply": "auth: oauth2 token request refused: invalid_grant (refresh_token [redacted] with client_secret [redacted] refused)"`,
	} {
		if !strings.Contains(strings.Join(answers, "\n"), want) {
			t.Errorf("the API does not show %s:\n%s", want, strings.Join(answers, "\n"))
		}
	}

	// Now the grant goes through and the upstream repeats the token,
	// until the messages expire into DSNs.
	mu.Lock()
	refusing = false
	mu.Unlock()
	r.waitLog("delivery attempt", map[string]string{"queue_id": viaOAuth, "reply": "451 4.7.0 token [redacted] may not send now"}, 30*time.Second)
	var dsns []string
	testwait.For(t, 60*time.Second, "both DSNs", func() bool {
		a, b := dsnsTo(up.Messages(), "app@example.com"), dsnsTo(oauthUp.Messages(), "app@oauth.example")
		if len(a) == 0 || len(b) == 0 {
			return false
		}
		dsns = []string{string(a[0].Data), string(b[0].Data)}
		return true
	})
	if !strings.Contains(dsns[0], "Diagnostic-Code: smtp; 451 4.2.2 quota of relay@example.com with password [redacted] exceeded") {
		t.Errorf("DSN through the password upstream:\n%s", dsns[0])
	}
	if !strings.Contains(dsns[1], "[redacted]") {
		t.Errorf("DSN through the OAuth2 upstream does not show the redacted reply:\n%s", dsns[1])
	}

	logText, err := os.ReadFile(r.logPath)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	secrets := append([]string{
		upPassword, base64.StdEncoding.EncodeToString([]byte(upPassword)),
		base64.StdEncoding.EncodeToString([]byte("\x00" + upUser + "\x00" + upPassword)),
		e2eClientSecret, url.QueryEscape(e2eClientSecret), e2eRefreshToken, url.QueryEscape(e2eRefreshToken),
	}, issued...)
	if len(issued) == 0 {
		t.Error("no token was issued")
	}
	mu.Unlock()
	for name, text := range map[string]string{
		"debug log": string(logText),
		"admin API": strings.Join(answers, "\n"),
		"DSNs":      strings.Join(dsns, "\n"),
	} {
		for _, secret := range secrets {
			if strings.Contains(text, secret) {
				t.Errorf("the %s shows secret %q", name, secret)
			}
		}
	}
}
