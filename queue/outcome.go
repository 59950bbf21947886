package queue

// Outcome is what happened, in one vocabulary for the logs, the metrics
// and the events of every level: to a message in one upstream's
// transaction, to a message in one attempt, to one recipient in an
// attempt, or to a message that left the queue. Which words each level
// uses is listed below.
type Outcome string

const (
	// OutcomeDelivered: every recipient concerned was taken by an
	// upstream (in a transaction: at least one).
	OutcomeDelivered Outcome = "delivered"
	// OutcomeDeferred: recipients stay pending, for a later attempt.
	OutcomeDeferred Outcome = "deferred"
	// OutcomeFailed: recipients were refused for good (a transaction
	// with none taken and at least one refused).
	OutcomeFailed Outcome = "failed"
	// OutcomeExpired: a recipient still pending after max_age, failed
	// for it.
	OutcomeExpired Outcome = "expired"
	// OutcomeSkipped: an upstream was left out of an attempt, being down
	// or at its rate limit.
	OutcomeSkipped Outcome = "skipped"
	// OutcomeBounced: a message left the queue with at least one
	// recipient failed or expired; a recipient refused for good.
	OutcomeBounced Outcome = "bounced"
	// OutcomeDeleted: an administrator deleted the message.
	OutcomeDeleted Outcome = "deleted"
)

// TransactionOutcomes are the outcomes of one upstream tried for a
// message: delivered, deferred, failed, or skipped without a transaction.
func TransactionOutcomes() []Outcome {
	return []Outcome{OutcomeDelivered, OutcomeDeferred, OutcomeFailed, OutcomeSkipped}
}

// RecipientOutcomes are what one attempt decided for a recipient, the
// message of the log line for it.
func RecipientOutcomes() []Outcome {
	return []Outcome{OutcomeDelivered, OutcomeDeferred, OutcomeBounced, OutcomeExpired}
}

// FinishedOutcomes are the ways a message leaves the queue.
func FinishedOutcomes() []Outcome {
	return []Outcome{OutcomeDelivered, OutcomeBounced, OutcomeDeleted}
}

// finishedOutcome is how a message that leaves the queue after an
// attempt ended.
func finishedOutcome(m Message) Outcome {
	for _, r := range m.Recipients {
		if r.State != Delivered {
			return OutcomeBounced
		}
	}
	return OutcomeDelivered
}
