// Package webhook posts the events of the queue's messages to the
// [[webhook]] endpoints, signed as Standard Webhooks
// (https://www.standardwebhooks.com) defines. The posts wait in the
// queue's storage, written in the commit of the event that makes them;
// a Dispatcher takes them from there, posts them at least once and
// retries with backoff, apart from mail delivery, which it never delays.
package webhook

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"smarthost/queue"
)

// Endpoint is one [[webhook]]: where its posts go, the key that signs
// them, and which events of whose messages it is posted.
type Endpoint struct {
	Name   string
	URL    string
	Key    Key
	Events []queue.EventType // of queue.WebhookEvents()
	Users  []string          // none: every user's messages
}

// DefaultEvents are the events an endpoint is posted when it names none:
// the failures a sender must act on.
func DefaultEvents() []queue.EventType {
	return []queue.EventType{queue.EventBounced, queue.EventExpired}
}

// Subscriptions are what the queue stores posts for: one per endpoint,
// named by the endpoint's name.
func Subscriptions(endpoints []Endpoint) []queue.Subscription {
	out := make([]queue.Subscription, 0, len(endpoints))
	for _, e := range endpoints {
		out = append(out, queue.Subscription{Endpoint: e.Name, Events: e.Events, Users: e.Users})
	}
	return out
}

// Key is an endpoint's signing key. It never reaches a log or a
// terminal: fmt, slog and encoding/json show it as "[redacted]".
type Key []byte

const redacted = "[redacted]"

// String hides the key from fmt's %v and %s.
func (Key) String() string { return redacted }

// GoString hides the key from fmt's %#v.
func (Key) GoString() string { return redacted }

// LogValue hides the key from slog.
func (Key) LogValue() slog.Value { return slog.StringValue(redacted) }

// MarshalText hides the key from encoders.
func (Key) MarshalText() ([]byte, error) { return []byte(redacted), nil }

// SecretPrefix starts a serialised symmetric key, as Standard Webhooks
// defines it: "whsec_" and the key in standard base64.
const SecretPrefix = "whsec_"

// Bounds of a key's size: Standard Webhooks asks for at least 24 random
// bytes and at most 512 bits.
const (
	MinKeySize = 24
	MaxKeySize = 64
)

// ParseSecret decodes a secret in the form "whsec_" + base64 of the key.
// Its errors never quote the secret.
func ParseSecret(s string) (Key, error) {
	b64, ok := strings.CutPrefix(strings.TrimSpace(s), SecretPrefix)
	if !ok {
		return nil, errors.New(`does not start with "whsec_" (want "whsec_" and the key in base64)`)
	}
	key, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return nil, errors.New(`what follows "whsec_" is not standard base64`)
	}
	if len(key) < MinKeySize || len(key) > MaxKeySize {
		return nil, fmt.Errorf("the key is %d bytes; want %d to %d random bytes", len(key), MinKeySize, MaxKeySize)
	}
	return Key(key), nil
}

// Sign returns the webhook-signature of a post: "v1," and the base64 of
// HMAC-SHA256 over "id.timestamp.body", timestamp in Unix seconds.
func Sign(key Key, id string, timestamp time.Time, body []byte) string {
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id))
	mac.Write([]byte{'.'})
	mac.Write(strconv.AppendInt(nil, timestamp.Unix(), 10))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))
}

// Payload is the JSON body of a post.
type Payload struct {
	Type      string         `json:"type"`      // "message." and the event
	Timestamp time.Time      `json:"timestamp"` // when the event happened
	Data      queue.PostData `json:"data"`
}

// Body is the JSON body that p is posted with: the same on every try.
func Body(p queue.WebhookPost) ([]byte, error) {
	return json.Marshal(Payload{Type: "message." + string(p.Type), Timestamp: p.At.UTC(), Data: p.Data})
}
