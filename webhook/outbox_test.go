package webhook_test

import (
	"cmp"
	"crypto/rand"
	"encoding/hex"
	"slices"
	"sync"
	"testing"
	"time"

	"smarthost/queue"
	"smarthost/webhook"
)

// filledOutbox is an Outbox that a test can put posts in, as the queue's
// commits do. add returns the stored post's ID.
type filledOutbox interface {
	webhook.Outbox
	add(t *testing.T, p queue.WebhookPost) string
	// post returns the stored post id, false once it is gone.
	post(t *testing.T, id string) (queue.WebhookPost, bool)
}

// outboxKinds are the Outboxes the dispatcher's tests run on.
func outboxKinds() map[string]func(t *testing.T) filledOutbox {
	return map[string]func(t *testing.T) filledOutbox{
		"memory": func(*testing.T) filledOutbox { return &memOutbox{posts: map[string]*queue.WebhookPost{}} },
	}
}

// forEachOutbox runs test on each kind of Outbox.
func forEachOutbox(t *testing.T, test func(t *testing.T, o filledOutbox)) {
	for name, newOutbox := range outboxKinds() {
		t.Run(name, func(t *testing.T) { test(t, newOutbox(t)) })
	}
}

// memOutbox keeps the Outbox contract in memory: posts are due oldest
// NextTry first, a taken post is leased for hold, a retry counts a try.
type memOutbox struct {
	mu    sync.Mutex
	posts map[string]*queue.WebhookPost
	takes int // DueWebhooks calls
}

func (o *memOutbox) add(t *testing.T, p queue.WebhookPost) string {
	var b [8]byte
	rand.Read(b[:])
	p.ID = "msg_" + hex.EncodeToString(b[:])
	if p.NextTry.IsZero() {
		p.NextTry = p.At
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	o.posts[p.ID] = &p
	return p.ID
}

func (o *memOutbox) post(t *testing.T, id string) (queue.WebhookPost, bool) {
	o.mu.Lock()
	defer o.mu.Unlock()
	p, ok := o.posts[id]
	if !ok {
		return queue.WebhookPost{}, false
	}
	return *p, true
}

func (o *memOutbox) DueWebhooks(now time.Time, hold time.Duration, limit int) ([]queue.WebhookPost, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.takes++
	var due []*queue.WebhookPost
	for _, p := range o.posts {
		if !p.NextTry.After(now) {
			due = append(due, p)
		}
	}
	slices.SortFunc(due, func(a, b *queue.WebhookPost) int {
		if c := a.NextTry.Compare(b.NextTry); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	var out []queue.WebhookPost
	for _, p := range due[:min(limit, len(due))] {
		out = append(out, *p)
		p.NextTry = now.Add(hold)
	}
	return out, nil
}

func (o *memOutbox) WebhookDone(id string) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	delete(o.posts, id)
	return nil
}

func (o *memOutbox) WebhookRetry(id string, next time.Time) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if p, ok := o.posts[id]; ok {
		p.Tries++
		p.NextTry = next
	}
	return nil
}

func (o *memOutbox) WebhookBacklog() (n int, oldest time.Time, err error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	for _, p := range o.posts {
		if oldest.IsZero() || p.At.Before(oldest) {
			oldest = p.At
		}
	}
	return len(o.posts), oldest, nil
}
