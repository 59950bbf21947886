package webhook_test

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"time"

	"smarthost/queue"
	"smarthost/webhook"
)

// verifyRequest checks that a request came from smarthost, as Standard Webhooks
// defines: secret is the "whsec_…" value of the [[webhook]], body the
// request's body as received (not parsed and encoded again).
func verifyRequest(secret string, r *http.Request, body []byte) error {
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
	if err != nil {
		return err
	}
	id, ts := r.Header.Get("webhook-id"), r.Header.Get("webhook-timestamp")
	sec, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return errors.New("no webhook-timestamp")
	}
	if d := time.Since(time.Unix(sec, 0)); d > 5*time.Minute || d < -5*time.Minute {
		return errors.New("webhook-timestamp too far from now: a replay?")
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id + "." + ts + "."))
	mac.Write(body)
	want := mac.Sum(nil)
	for _, sig := range strings.Fields(r.Header.Get("webhook-signature")) {
		if b64, ok := strings.CutPrefix(sig, "v1,"); ok {
			if got, err := base64.StdEncoding.DecodeString(b64); err == nil && hmac.Equal(got, want) {
				return nil
			}
		}
	}
	return errors.New("no valid signature")
}

// A receiver that checks each post's signature, over a real connection
// from a Dispatcher.
func Example_receiver() {
	const secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
	got := make(chan string, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil || verifyRequest(secret, r, body) != nil {
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		var ev struct {
			Type string `json:"type"`
			Data struct {
				Rcpt  string `json:"rcpt"`
				Reply string `json:"reply"`
			} `json:"data"`
		}
		if err := json.Unmarshal(body, &ev); err != nil {
			http.Error(w, "bad body", http.StatusBadRequest)
			return
		}
		// webhook-id is the same on every try: a receiver that must act
		// once keeps the IDs it has seen.
		got <- fmt.Sprintf("%s %s: %s", ev.Type, ev.Data.Rcpt, ev.Data.Reply)
		w.WriteHeader(http.StatusNoContent)
	}))
	defer srv.Close()

	key, _ := webhook.ParseSecret(secret)
	outbox := &memOutbox{posts: map[string]*queue.WebhookPost{}}
	outbox.add(nil, queue.WebhookPost{Endpoint: "billing", Type: queue.EventBounced, At: time.Now(), Data: queue.PostData{
		QueueID: "Q1", User: "billing-app", From: "billing@example.com", Rcpt: "bob@example.net",
		Reply: "550 5.1.1 no such user", Status: "bounced", Attempt: 1,
	}})
	d := webhook.NewDispatcher(outbox, []webhook.Endpoint{{Name: "billing", URL: srv.URL, Key: key}})
	go d.Run()
	defer d.Close()
	fmt.Println(<-got)
	// Output: message.bounced bob@example.net: 550 5.1.1 no such user
}
