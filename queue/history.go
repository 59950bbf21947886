package queue

import (
	"strings"
	"time"
)

// pruneBatch is how many histories one commit of the pruning removes, so
// that no long write transaction holds the queue.
const pruneBatch = 500

// EventType names a thing that happened to a message, an event of its
// history.
type EventType string

const (
	EventAccepted EventType = "accepted" // stored, with its recipients
	// EventTried: an upstream's answer for a recipient that the attempt
	// then took to the next upstream of its route.
	EventTried EventType = "tried"
	// A recipient's outcome in an attempt: Rcpt, Attempt, Upstream, Relay
	// and Reply say which, when, through what and what was answered.
	EventDelivered EventType = "delivered"
	EventDeferred  EventType = "deferred"
	EventBounced   EventType = "bounced"
	EventExpired   EventType = "expired"
	// EventDSN: a delivery status notification queued, DSNID.
	EventDSN EventType = "dsn"
	// By the admin API.
	EventHeld     EventType = "held"
	EventReleased EventType = "released"
	EventRetried  EventType = "retried"
	EventDeleted  EventType = "deleted"
)

// Event is one entry of a message's history.
type Event struct {
	At       time.Time `json:"at"`
	Type     EventType `json:"type"`
	Attempt  int       `json:"attempt,omitempty"`
	Rcpt     string    `json:"rcpt,omitempty"`
	Upstream string    `json:"upstream,omitempty"`
	Relay    string    `json:"relay,omitempty"` // the address of the server that answered
	Reply    string    `json:"reply,omitempty"`
	DSNID    string    `json:"dsn_id,omitempty"`
}

// History is what a queue keeps of a message, from its acceptance until
// its retention ends after it left the queue.
type History struct {
	ID         string    `json:"id"`
	MessageID  string    `json:"msg_id,omitempty"`
	From       string    `json:"from"`
	User       string    `json:"user,omitempty"`
	Recipients []string  `json:"rcpts"`
	Received   time.Time `json:"received"`
	// Left is when the message left the queue (zero while it is queued),
	// and Outcome how: delivered, bounced or deleted.
	Left    time.Time `json:"left,omitzero"`
	Outcome Outcome   `json:"outcome,omitempty"`
	// Events in the order they happened; FindHistory leaves them out.
	Events []Event `json:"events,omitempty"`
}

// HistoryFilter selects messages by history: every field set must match.
// Addresses match whole and without regard to case; a Message-ID with or
// without its angle brackets.
type HistoryFilter struct {
	To, From, User, MessageID string
	// Since and Until bound when the message was received.
	Since, Until time.Time
	// Limit bounds the answer, newest first; default and at most
	// MaxHistoryResults.
	Limit int
}

// MaxHistoryResults bounds a FindHistory answer.
const MaxHistoryResults = 1000

// newHistory is the history of a message just stored: its acceptance.
func newHistory(m *Message) *History {
	h := &History{
		ID: m.ID, MessageID: m.MessageID, From: m.From, User: m.User, Received: m.Received,
		Events: []Event{{At: m.Received, Type: EventAccepted}},
	}
	for _, r := range m.Recipients {
		h.Recipients = append(h.Recipients, r.Addr)
	}
	return h
}

// historyKeys are the values a message's history is found by: kind and
// value pairs, normalised as lookups normalise them.
func (h *History) keys() [][2]string {
	out := [][2]string{{"r", ""}, {"f", strings.ToLower(h.From)}}
	if h.User != "" {
		out = append(out, [2]string{"u", h.User})
	}
	if id := normMessageID(h.MessageID); id != "" {
		out = append(out, [2]string{"m", id})
	}
	seen := map[string]bool{}
	for _, r := range h.Recipients {
		if r = strings.ToLower(r); !seen[r] {
			seen[r] = true
			out = append(out, [2]string{"t", r})
		}
	}
	return out
}

// lookup is the most selective key of f to search by, and whether h,
// found by it, matches the rest of f.
func (f HistoryFilter) lookup() (kind, value string) {
	switch {
	case f.MessageID != "":
		return "m", normMessageID(f.MessageID)
	case f.To != "":
		return "t", strings.ToLower(f.To)
	case f.User != "":
		return "u", f.User
	case f.From != "":
		return "f", strings.ToLower(f.From)
	}
	return "r", ""
}

func (f HistoryFilter) matches(h *History) bool {
	if f.MessageID != "" && normMessageID(h.MessageID) != normMessageID(f.MessageID) {
		return false
	}
	if f.From != "" && !strings.EqualFold(h.From, f.From) {
		return false
	}
	if f.User != "" && h.User != f.User {
		return false
	}
	if f.To != "" && !containsFold(h.Recipients, f.To) {
		return false
	}
	if !f.Since.IsZero() && h.Received.Before(f.Since) {
		return false
	}
	return f.Until.IsZero() || !h.Received.After(f.Until)
}

func (f HistoryFilter) limit() int {
	if f.Limit <= 0 || f.Limit > MaxHistoryResults {
		return MaxHistoryResults
	}
	return f.Limit
}

func containsFold(list []string, s string) bool {
	for _, x := range list {
		if strings.EqualFold(x, s) {
			return true
		}
	}
	return false
}

// normMessageID is a Message-ID without its angle brackets.
func normMessageID(id string) string {
	return strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(id), "<"), ">")
}

// attemptEvents are the events of an attempt's outcome on m at now: one
// per recipient it decided something for, and one per DSN it queued.
func attemptEvents(m Message, out outcome, dsns []DSN, now time.Time) []Event {
	var evs []Event
	for _, ro := range out.rcpts {
		for _, r := range ro.earlier {
			evs = append(evs, Event{
				At: now, Type: EventTried, Attempt: m.Attempts,
				Rcpt: ro.Addr, Upstream: r.Upstream, Relay: r.Relay, Reply: r.Reply,
			})
		}
		evs = append(evs, Event{
			// A recipient's outcomes (RecipientOutcomes) are named as
			// the events that record them.
			At: now, Type: EventType(ro.outcome), Attempt: m.Attempts,
			Rcpt: ro.Addr, Upstream: ro.Upstream, Relay: ro.relay, Reply: ro.Reply,
		})
	}
	for _, d := range dsns {
		evs = append(evs, Event{At: now, Type: EventDSN, Attempt: m.Attempts, DSNID: d.Message.ID})
	}
	return evs
}

// pruneHistory removes, until the scheduler stops, the histories whose
// retention has ended: every quarter of the retention (at least a second,
// at most a minute), pruneBatch at a time, other writes let in between.
func (s *Scheduler) pruneHistory() {
	defer s.wg.Done()
	every := min(max(s.HistoryRetention/4, time.Second), time.Minute)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		before := s.Now().Add(-s.HistoryRetention)
		for {
			n, err := s.Backend.PruneHistory(before, pruneBatch)
			if err != nil {
				s.Logger.Warn("queue: removing the histories past their retention failed", "err", err)
				break
			}
			if n < pruneBatch {
				break
			}
			select {
			case <-s.stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
}
