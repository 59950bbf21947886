package queue

import (
	"context"
	"errors"
	"io"
	"time"
)

// ErrClaimLost is returned by Finish for an attempt that the backend no
// longer holds: already finished, taken over, or never handed out. Its
// outcome is not recorded; the message is retried.
var ErrClaimLost = errors.New("queue: the claim on the message was lost")

// ErrUnavailable wraps the errors of a backend that cannot reach its
// storage (a database that is down or unreachable), as opposed to one
// that reached it and failed: the first passes by itself.
var ErrUnavailable = errors.New("queue: storage unavailable")

// Backend is the queue's storage: everything the submission side, the
// Scheduler, the admin API, the metrics, salvage and serve do to queued
// messages. The bbolt Store is one; every Backend passes the conformance
// suite in queue/queuetest.
//
// Durability: a method that changes the queue returns only once the
// change is committed (fsynced, for a file), and what it returns, or a
// later Get, List or Stats, reflects it. Atomicity: each change is one
// commit, all of it or nothing. A message that is not held is due at its
// NextAttempt; a held one is never claimed. The methods are safe for
// concurrent use.
type Backend interface {
	// Put stores m with its body and makes it due at once. It fills in
	// m.ID (if empty), m.Received (if zero), m.Size (if zero) and
	// m.NextAttempt, and sets every recipient Pending. If the Intake takes
	// the message (SetIntake), it is claimed for its first attempt in the
	// same commit. Concurrent Puts may share a commit. ErrExists if m.ID
	// is given and already stored. The caller must not change body once
	// Put has returned: a first attempt may read it.
	Put(ctx context.Context, m *Message, body []byte) error
	// NewSpool returns an empty file for the part of a large message past
	// its head, written as the message arrives.
	NewSpool() (*Spool, error)
	// PutSpooled stores m like Put, with head followed by the content of
	// sp as its body, and takes sp over; on failure it removes sp's file.
	// m.Size, if zero, becomes the total size.
	PutSpooled(ctx context.Context, m *Message, head []byte, sp *Spool) error
	// Import stores m as it is (its ID, recipients' states, attempts,
	// times and flags), with body followed by what rest, if not nil,
	// reads: a message carried over from another queue. It is due at
	// m.NextAttempt unless held; no attempt is in progress. ErrExists if
	// the ID is already stored, and then nothing is changed.
	Import(ctx context.Context, m Message, body []byte, rest io.Reader) error

	// SetIntake makes in the taker of new messages for Put, or, with nil,
	// stops that. A Scheduler sets itself while it runs.
	SetIntake(in Intake)
	// Claim takes up to limit messages due at at.Now (NextAttempt not
	// later), earliest NextAttempt first, leaving out held ones and those
	// whose ID skip rejects (a nil skip rejects none), and records an
	// attempt on each in one commit before returning it (Start). A message
	// claimed is not claimed again while its claim holds: until its
	// Finish, and at least until the NextAttempt recorded with it (a
	// backend with leases: while the lease is renewed). Concurrent Claims
	// never return one message twice.
	Claim(ctx context.Context, at Start, limit int, skip func(id string) bool) (Claimed, error)
	// OpenBody opens the content of a claimed message for its attempt,
	// outside any transaction: it is streamed, never read whole into
	// memory. close releases it once the attempt is over. If the content
	// past its head cannot be opened, OpenBody returns the error with a
	// Body of the head alone, so that a DSN can still quote the header
	// section; an error that wraps fs.ErrNotExist means the content is
	// lost for good.
	OpenBody(a Attempt) (b Body, close func(), err error)
	// Finish ends attempt a in one commit: update changes the stored
	// message (it may run more than once, each time on a fresh copy, so it
	// must be deterministic) and returns whether the message leaves the
	// queue and the DSNs to store with the outcome. A crash keeps both or
	// neither. A message deleted during the attempt is neither brought
	// back nor bounced: Finish stores nothing and returns an error that
	// wraps ErrNotFound; ErrClaimLost if the backend no longer holds a.
	//
	// events go into the message's history in the same commit; when the
	// message leaves the queue, its history records that and is kept for
	// the backend's retention.
	Finish(ctx context.Context, a Attempt, events []Event, update func(m *Message) (remove bool, dsns []DSN)) (Finished, error)
	// Wake returns a channel that receives when a message may be due
	// sooner than the last Claim reported: a new message that the Intake
	// did not take, an import, a DSN, a release, a retry or a flush. One
	// pending signal stands for any number.
	Wake() <-chan struct{}

	// Get returns one message or an error wrapping ErrNotFound.
	Get(id string) (*Entry, error)
	// History returns the history of a message, queued or gone within its
	// retention, with its events in order; ErrNotFound if there is none.
	// Put, Import, Finish (and its DSNs), Hold, Release, Retry and Delete
	// record events in the commit of their change.
	History(id string) (*History, error)
	// FindHistory returns the histories that f selects, newest first,
	// without their events, through an index: the cost grows with the
	// answer, not with what is stored.
	FindHistory(f HistoryFilter) ([]History, error)
	// PruneHistory removes the histories of at most max messages that
	// left the queue before before, in one short commit, and returns how
	// many it removed.
	PruneHistory(before time.Time, max int) (int, error)
	// DueWebhooks takes up to limit webhook posts due at now, oldest
	// first, and moves each one's NextTry to now+hold in the same commit,
	// so that no other dispatcher takes it meanwhile and it is tried again
	// if this one dies. Posts are stored with the events that make them,
	// for the subscriptions the backend was opened with.
	DueWebhooks(now time.Time, hold time.Duration, limit int) ([]WebhookPost, error)
	// WebhookDone removes a post: its endpoint took it, or it was given
	// up. A post already gone is no error.
	WebhookDone(id string) error
	// WebhookRetry records a failed try of a post and when it is due
	// again. A post already gone is no error.
	WebhookRetry(id string, next time.Time) error
	// WebhookBacklog counts the posts waiting, and tells when the event of
	// the oldest happened (zero when none waits).
	WebhookBacklog() (n int, oldest time.Time, err error)
	// Content opens the stored content of a queued message, the bytes
	// that its delivery sends, to be streamed outside any transaction
	// (as OpenBody); close releases it. An error wrapping ErrNotFound if
	// the message is not queued.
	Content(id string) (b Body, close func(), err error)
	// List returns every queued message, oldest (Received) first, and
	// those whose records cannot be read, by ID: one bad record does not
	// hide the rest.
	List() ([]Entry, []Unreadable, error)
	// Hold keeps a message out of delivery until Release. Holding a held
	// message does nothing; one being delivered finishes its attempt and
	// then stays held.
	Hold(id string) error
	// Release ends a hold and makes the message due now; releasing one
	// that is not held does nothing. A message still being delivered
	// keeps the next attempt its current one scheduled.
	Release(id string) error
	// Retry makes a message due now; ErrHeld if it is held. For a message
	// being delivered it does nothing: the attempt in progress is its
	// retry.
	Retry(id string) error
	// Delete removes a message, its body and any spool file, without a
	// bounce. A message being delivered is deleted too; its attempt's
	// Finish then stores nothing.
	Delete(id string) error
	// Flush makes every message due now except held ones and those being
	// delivered, and returns how many that is (those due already
	// included). Unreadable records are left alone.
	Flush() (int, error)

	// Stats returns the queue's size by state and its oldest message,
	// exact after every committed change, without reading every message.
	Stats() (Stats, error)
	// Len returns the number of queued messages, unreadable ones included.
	Len() (int, error)
	// Recovered returns how many messages the backend found, when it
	// opened, with an attempt whose outcome is unknown: the process
	// stopped during it. Each is retried when due, and may reach its
	// recipients twice (at-least-once).
	Recovered() int
	// Writable reports whether the backend can commit changes; false
	// from a failed commit until one succeeds, which the backend tries by
	// itself meanwhile.
	Writable() bool
	// Close waits for the commits in progress and closes the backend. A
	// second Close does nothing.
	Close() error
}

// Intake takes new messages from a Backend's Put for their first attempt
// in the commit that stores them, sparing each message a second commit
// for its claim. A Scheduler is one.
type Intake interface {
	// Reserve is asked by Put, before it commits new message id, whether
	// to claim it for an attempt, and how to record that attempt. Put
	// follows every Reserve that returned ok with exactly one Enqueue, if
	// the message was stored, or Cancel.
	Reserve(id string) (at Start, ok bool)
	// Enqueue hands over the attempt on a message that Reserve took, once
	// it is committed. It must not block.
	Enqueue(a Attempt)
	// Cancel gives back what Reserve took for a message that was not
	// stored.
	Cancel(id string)
}

// Start is how a backend records an attempt that it hands out, before any
// delivery begins: Attempts counts it, LastAttempt is Now, and
// NextAttempt is Retry(n), n being the attempts made so far less those
// only paced (Attempts − Paced), so that an attempt whose outcome is never
// recorded is retried then.
type Start struct {
	Now   time.Time
	Retry func(n int) time.Time
}

// Attempt is a delivery attempt that a backend has recorded on a message
// and handed out, from Claim or to an Intake; OpenBody and Finish take it
// back.
type Attempt struct {
	// Message is the message as stored with the attempt recorded.
	Message Message
	// Token names the attempt to its backend, which records an outcome
	// only for the attempt it still holds. The bbolt Store uses the
	// attempt's number; a backend with leases names the lease.
	Token uint64

	// head is the content, or its first part for a spooled message, as
	// the backend read it with the claim; spooled says a spool file
	// follows.
	head    []byte
	spooled bool
	// stored is the record as the backend wrote it with the attempt, for
	// a backend that can then finish the attempt in one statement while
	// the record is unchanged; nil if it has none.
	stored []byte
	lapsed <-chan struct{}
}

// Lapsed is closed when the backend can no longer vouch that this is the
// only attempt on its message: a backend shared by replicas could not
// renew the attempt's lease in time, and another replica may take the
// message over. The attempt must then stop. Nil, never closed, for a
// backend of one process.
func (a Attempt) Lapsed() <-chan struct{} { return a.lapsed }

// Claimed is what one Claim took and what it found.
type Claimed struct {
	// Attempts are the messages claimed, in due order.
	Attempts []Attempt
	// Wake is the NextAttempt of the earliest message left, neither
	// skipped nor claimed by this Claim; zero if there is none.
	Wake time.Time
	// Unreadable are the IDs of due records that cannot be decoded. They
	// are taken out of due order, so that they are not retried in a loop.
	Unreadable []string
}

// DSN is a delivery status notification that Finish stores in the commit
// that records the outcome calling for it.
type DSN struct {
	// Message is the DSN, with ID, Received and NextAttempt set.
	Message Message
	Body    []byte
	Kind    BounceKind
}

// Finished is what Finish did with an attempt's outcome.
type Finished struct {
	Message Message // as stored, or as it was when it left the queue
	Removed bool    // no recipient pending: the message left the queue
}

// Entry is a queued message as Get and List show it: the message as
// stored and, derived from the backend's claims, whether an attempt on it
// is in progress.
type Entry struct {
	Message
	InFlight bool `json:"in_flight,omitempty"`
}

// Unreadable is a queued message whose record cannot be decoded: List
// reports it by its ID, with the reason, and Delete removes it.
type Unreadable struct {
	ID     string
	Reason string
}
