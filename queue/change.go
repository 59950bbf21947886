package queue

import (
	"slices"
	"sync/atomic"
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

// newRecord is what Put stores for a new message m whose content, or its
// head, is body: m gets an ID and a time of receipt (unless given; kept
// as keep rounds it, at the precision the backend stores), is due at
// once, has its size (unless given) and every recipient pending.
func newRecord(m *Message, body []byte, spooled bool, now time.Time, keep func(time.Time) time.Time) record {
	if m.ID == "" {
		m.ID = NewID()
	}
	if m.Received.IsZero() {
		m.Received = now
	}
	m.Received = keep(m.Received)
	m.NextAttempt = m.Received
	if m.Size == 0 {
		m.Size = int64(len(body))
	}
	for i := range m.Recipients {
		m.Recipients[i].State = Pending
	}
	return record{Message: *m, Spooled: spooled}
}

// intakeSlot holds the Intake that a backend's Put offers new messages
// to (Backend.SetIntake).
type intakeSlot struct{ p atomic.Pointer[Intake] }

func (s *intakeSlot) set(in Intake) {
	if in == nil {
		s.p.Store(nil)
		return
	}
	s.p.Store(&in)
}

// reserve offers the new message of rec to the Intake, if any. The one
// that takes it is returned, after the first attempt is recorded on
// rec's own recipients, to be stored in the commit that stores the
// message; nil if none took it.
func (s *intakeSlot) reserve(rec *record) Intake {
	p := s.p.Load()
	if p == nil {
		return nil
	}
	at, taken := (*p).Reserve(rec.ID)
	if !taken {
		return nil
	}
	rec.Recipients = slices.Clone(rec.Recipients)
	begin(&rec.Message, at)
	return *p
}
