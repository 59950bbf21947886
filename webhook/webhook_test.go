package webhook_test

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"smarthost/queue"
	"smarthost/webhook"
)

// The example of the reference implementation's tests
// (standard-webhooks, libraries/go/webhook_test.go, TestWebhookSign).
func TestSignMatchesStandardWebhooksExample(t *testing.T) {
	key, err := webhook.ParseSecret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
	if err != nil {
		t.Fatal(err)
	}
	got := webhook.Sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", time.Unix(1614265330, 0), []byte(`{"test": 2432232314}`))
	if want := "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="; got != want {
		t.Errorf("signature %s, want %s", got, want)
	}
}

func TestParseSecret(t *testing.T) {
	key := make([]byte, 32)
	rand.Read(key)
	b64 := base64.StdEncoding.EncodeToString
	for _, tc := range []struct {
		secret string
		want   []byte
		err    string
	}{
		{"whsec_" + b64(key), key, ""},
		{"whsec_" + b64(key) + "\n", key, ""},
		{b64(key), nil, `"whsec_"`},
		{"whsec_" + b64(key)[:10] + "!" + b64(key)[11:], nil, "base64"},
		{"whsec_" + base64.RawStdEncoding.EncodeToString(key[:31]), nil, "base64"},
		{"whsec_" + b64(key[:23]), nil, "23 bytes"},
		{"whsec_" + b64(key[:24]), key[:24], ""},
		{"whsec_" + b64(append(key, key...)), append(key, key...), ""},
		{"whsec_" + b64(append(append(key, key...), 1)), nil, "65 bytes"},
	} {
		got, err := webhook.ParseSecret(tc.secret)
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.secret, err)
		case tc.err == "" && !bytes.Equal(got, tc.want):
			t.Errorf("%q: key %x, want %x", tc.secret, []byte(got), tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: error %v, want one saying %s", tc.secret, err, tc.err)
		case err != nil && strings.Contains(err.Error(), strings.TrimPrefix(strings.TrimSpace(tc.secret), "whsec_")):
			t.Errorf("%q: the error quotes the secret: %v", tc.secret, err)
		}
	}
}

func TestKeyIsNeverPrinted(t *testing.T) {
	key := make([]byte, 32)
	rand.Read(key)
	ep := webhook.Endpoint{Name: "billing", URL: "https://hooks.example/x", Key: key}
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("endpoint", "endpoint", ep, "key", ep.Key)
	js, err := json.Marshal(ep)
	if err != nil {
		t.Fatal(err)
	}
	for _, out := range []string{fmt.Sprintf("%v %+v %#v %s %x", ep, ep, ep, ep.Key, ep.Key), logged.String(), string(js)} {
		for _, leak := range []string{base64.StdEncoding.EncodeToString(key), fmt.Sprintf("%x", key), fmt.Sprint([]byte(key))} {
			if strings.Contains(out, leak) {
				t.Errorf("the key shows in %s", out)
			}
		}
		if !strings.Contains(out, "redacted") {
			t.Errorf("no [redacted] in %s", out)
		}
	}
}

func TestSubscriptions(t *testing.T) {
	eps := []webhook.Endpoint{
		{Name: "a", Events: []queue.EventType{queue.EventBounced}, Users: []string{"app"}},
		{Name: "b", Events: webhook.DefaultEvents()},
	}
	subs := webhook.Subscriptions(eps)
	if len(subs) != 2 || subs[0].Endpoint != "a" || subs[0].Events[0] != queue.EventBounced || subs[0].Users[0] != "app" ||
		subs[1].Endpoint != "b" || len(subs[1].Events) != 2 || subs[1].Users != nil {
		t.Errorf("subscriptions %+v", subs)
	}
}

func TestBody(t *testing.T) {
	at := time.Date(2026, 3, 4, 5, 6, 7, 890000000, time.FixedZone("x", 3600))
	p := queue.WebhookPost{ID: "msg_1", Endpoint: "a", Type: queue.EventBounced, At: at, Data: queue.PostData{
		QueueID: "Q1", MessageID: "<m@x>", User: "app", From: "a@x", Rcpt: "b@y", Upstream: "up",
		Reply: "550 5.1.1 no such user", Status: "bounced", Attempt: 2,
	}}
	body, err := webhook.Body(p)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"type": "message.bounced", "timestamp": "2026-03-04T04:06:07.89Z",
		"data": map[string]any{
			"queue_id": "Q1", "msg_id": "<m@x>", "user": "app", "from": "a@x", "rcpt": "b@y", "upstream": "up",
			"reply": "550 5.1.1 no such user", "status": "bounced", "attempt": float64(2),
		},
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("body %s\nwant %v", body, want)
	}
}
