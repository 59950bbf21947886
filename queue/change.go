package queue

import (
	"slices"
	"time"
)

// What the operations do to a stored record, whichever backend stores it.

// releaseAt is what Release does to a stored record, in every backend: a
// held message not being delivered becomes due at now.
func releaseAt(now time.Time) func(rec *record, inFlight bool) (bool, error) {
	return func(rec *record, inFlight bool) (bool, error) {
		if !rec.Held {
			return false, nil
		}
		rec.Held = false
		if !inFlight {
			rec.NextAttempt = now
		}
		return true, nil
	}
}

// retryAt is what Retry does to a stored record, in every backend.
func retryAt(now time.Time) func(rec *record, inFlight bool) (bool, error) {
	return func(rec *record, inFlight bool) (bool, error) {
		if rec.Held {
			return false, ErrHeld
		}
		if inFlight {
			return false, nil
		}
		rec.NextAttempt = now
		return true, nil
	}
}

// reserve offers the new message of rec to the Intake in, if any, and,
// if it takes it, records its first attempt on rec's own recipients, to
// be stored in the commit that stores the message.
func reserve(in Intake, rec *record) bool {
	if in == nil {
		return false
	}
	at, taken := in.Reserve(rec.ID)
	if taken {
		rec.Recipients = slices.Clone(rec.Recipients)
		begin(&rec.Message, at)
	}
	return taken
}
