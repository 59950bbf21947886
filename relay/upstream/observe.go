package upstream

import (
	"time"

	"smarthost/queue"
)

// Observer is told what the Deliverer does with each upstream, for
// metrics. upstream is the Upstream's Name. Calls come from the delivery
// goroutines: they must be quick and safe for concurrent use.
type Observer interface {
	// Transaction: one upstream was tried for a message, from taking a
	// connection to the end of the transaction, with result
	// queue.OutcomeDelivered (at least one recipient taken),
	// queue.OutcomeFailed (none taken, at least one refused for good) or
	// queue.OutcomeDeferred (none decided).
	Transaction(upstream string, result queue.Outcome, took time.Duration)
	// Skipped: an upstream was left out of a delivery, being down or at
	// its rate limit.
	Skipped(upstream string)
	// Delivered: a message a client submitted (not a DSN) was taken by
	// upstream, sinceAccepted after the relay accepted it.
	Delivered(upstream string, sinceAccepted time.Duration)
}
