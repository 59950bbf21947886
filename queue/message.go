package queue

import "time"

// RcptState is the delivery state of one recipient of a message.
type RcptState uint8

const (
	// Pending recipients are still to be delivered.
	Pending RcptState = iota
	// Delivered recipients were accepted by an upstream.
	Delivered
	// Failed recipients were refused permanently, or expired.
	Failed
)

func (s RcptState) String() string {
	switch s {
	case Pending:
		return "pending"
	case Delivered:
		return "delivered"
	case Failed:
		return "failed"
	}
	return "unknown"
}

// Recipient is one envelope recipient and what happened to it so far.
type Recipient struct {
	Addr     string    `json:"addr"`
	State    RcptState `json:"state"`
	Reply    string    `json:"reply,omitempty"`    // last upstream reply for this recipient
	Upstream string    `json:"upstream,omitempty"` // upstream that gave Reply
}

// Message is a queued message's envelope and delivery state. The body is
// stored apart from it and loaded only for delivery.
type Message struct {
	ID          string      `json:"id"`
	From        string      `json:"from"` // envelope sender; "" is the null sender <>
	Recipients  []Recipient `json:"rcpts"`
	User        string      `json:"user,omitempty"`   // authenticated submitter, if any
	MessageID   string      `json:"msg_id,omitempty"` // header Message-ID, for logs
	Size        int64       `json:"size"`
	Received    time.Time   `json:"received"` // when it was accepted
	Attempts    int         `json:"attempts"`
	LastAttempt time.Time   `json:"last_attempt,omitzero"`
	NextAttempt time.Time   `json:"next_attempt"`
	LastReply   string      `json:"last_reply,omitempty"`
	// DSN marks a delivery status notification: it is routed by its
	// recipient's domain and never bounced itself (RFC 3461 section 6.2).
	DSN bool `json:"dsn,omitempty"`
	// Held keeps the message out of delivery until it is released.
	Held bool `json:"held,omitempty"`
	// Warned records that a delay warning was sent for the message.
	Warned bool `json:"warned,omitempty"`
	// Paced counts the attempts, among Attempts, that were deferred only
	// by an upstream's rate limit (every pending Result had NotBefore).
	// They do not grow the retry backoff.
	Paced int `json:"paced,omitempty"`
}

// Pending returns the recipients that still wait for delivery.
func (m *Message) Pending() []string {
	var out []string
	for _, r := range m.Recipients {
		if r.State == Pending {
			out = append(out, r.Addr)
		}
	}
	return out
}

// Result is the outcome of one delivery attempt for one recipient.
type Result struct {
	Rcpt     string
	State    RcptState // Pending means a temporary failure: retry later
	Reply    string    // the upstream's reply, or the local error text
	Upstream string
	// Relay is the address of the upstream server that answered, if one
	// did.
	Relay string
	// Earlier are the answers of the upstreams tried before for this
	// recipient in the same attempt, each failed over to the next.
	Earlier []Result
	// NotBefore, on a Pending result, asks for no retry before that time
	// (an upstream's rate limit); it does not count as a failure.
	NotBefore time.Time
}
