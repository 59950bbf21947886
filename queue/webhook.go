package queue

import (
	"crypto/rand"
	"encoding/base32"
	"slices"
	"strings"
	"time"
)

// Subscription is what one webhook endpoint is posted: the events of
// these types, of the messages these users submitted (all when none).
type Subscription struct {
	Endpoint string
	Events   []EventType // of accepted, delivered, deferred, bounced, expired
	Users    []string
}

// WebhookEvents are the event types a Subscription may ask for.
func WebhookEvents() []EventType {
	return []EventType{EventAccepted, EventDelivered, EventDeferred, EventBounced, EventExpired}
}

// WebhookPost is one event waiting to be posted to one endpoint. It is
// stored in the commit that records the event, so that neither a crash
// nor a restart loses or invents one, and it stays until the endpoint has
// taken it (at least once) or its time is up.
type WebhookPost struct {
	// ID is the webhook-id: the same on every try.
	ID       string    `json:"id"`
	Endpoint string    `json:"endpoint"`
	Type     EventType `json:"type"`
	At       time.Time `json:"at"` // when the event happened
	Data     PostData  `json:"data"`
	Tries    int       `json:"tries"`
	// NextTry is when the post is due; a dispatcher that takes it moves
	// it on by its hold, so that it is tried again if the dispatcher dies.
	NextTry time.Time `json:"next_try"`
}

// PostData is what a post says about its message and recipient.
type PostData struct {
	QueueID   string `json:"queue_id"`
	MessageID string `json:"msg_id"`
	User      string `json:"user"`
	From      string `json:"from"`
	Rcpt      string `json:"rcpt,omitempty"`
	Upstream  string `json:"upstream,omitempty"`
	Reply     string `json:"reply,omitempty"`
	Status    string `json:"status"` // the event: accepted, delivered, deferred, bounced, expired
	Attempt   int    `json:"attempt,omitempty"`
}

// webhookPosts are the posts that the subscriptions subs call for, for
// the events evs of message m (accepted: one for the message; an outcome:
// one per recipient), due at once.
func webhookPosts(subs []Subscription, m *Message, evs []Event) []WebhookPost {
	var out []WebhookPost
	for _, sub := range subs {
		if len(sub.Users) > 0 && !slices.Contains(sub.Users, m.User) {
			continue
		}
		for _, ev := range evs {
			if !slices.Contains(sub.Events, ev.Type) {
				continue
			}
			out = append(out, WebhookPost{
				ID: newWebhookID(), Endpoint: sub.Endpoint, Type: ev.Type, At: ev.At, NextTry: ev.At,
				Data: PostData{
					QueueID: m.ID, MessageID: m.MessageID, User: m.User, From: m.From,
					Rcpt: ev.Rcpt, Upstream: ev.Upstream, Reply: ev.Reply, Status: string(ev.Type), Attempt: ev.Attempt,
				},
			})
		}
	}
	return out
}

// newWebhookID is a webhook-id: "msg_" and 128 random bits, as Standard
// Webhooks' own examples name them.
func newWebhookID() string {
	var b [16]byte
	rand.Read(b[:])
	return "msg_" + strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(b[:]))
}

// acceptedPosts are the posts for the acceptance of m, which has just
// been stored; none for a DSN, which nobody submitted.
func acceptedPosts(subs []Subscription, m *Message) []WebhookPost {
	if len(subs) == 0 || m.DSN {
		return nil
	}
	return webhookPosts(subs, m, []Event{{At: m.Received, Type: EventAccepted}})
}
