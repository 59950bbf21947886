package upstream

import (
	"errors"
	"io"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-smtp"

	"smarthost/queue"
)

// txOutcome is what one mail transaction did.
type txOutcome struct {
	results []queue.Result // one per recipient, in order
	// failover marks the pending results that another upstream may try at
	// once.
	failover []bool
	err      error // the session broke; the connection is unusable
	reusable bool  // the connection may carry another transaction
	canQuit  bool  // the upstream can still answer QUIT
	dataSent bool  // the final dot went out: the message counts for the rate limit
	health   HealthEvent
	// healthReason is the failure that health reports, if any.
	healthReason string
}

// set records a recipient's result; a temporary failure may go to the
// next upstream unless the caller says otherwise.
func (o *txOutcome) set(i int, rcpt, upstream, relay string, state queue.RcptState, reply string) {
	o.results[i] = queue.Result{Rcpt: rcpt, State: state, Reply: reply, Upstream: upstream, Relay: relay}
	o.failover[i] = state == queue.Pending
}

// transact runs one mail transaction (RFC 5321 section 3.3) on an open
// connection and returns one result per recipient. A 5xx to MAIL fails
// every recipient, a 5xx to RCPT that recipient, a 5xx to DATA or after the
// final dot every accepted one; 4xx leaves them pending for the next
// upstream, except when the reply after the final dot never came.
func (d *Deliverer) transact(uc *upstreamConn, from string, rcpts []string, body queue.Body) txOutcome {
	c := uc.client
	upName, relay := uc.upstream, uc.raw.RemoteAddr().String()
	out := txOutcome{results: make([]queue.Result, len(rcpts)), failover: make([]bool, len(rcpts))}
	set := func(idx []int, state queue.RcptState, reply string) {
		for _, i := range idx {
			out.set(i, rcpts[i], upName, relay, state, reply)
		}
	}
	// broken ends the transaction on a lost connection: the recipients idx
	// stay pending, free to fail over unless the message may have been
	// taken.
	broken := func(stage string, err error, idx []int, failover bool) txOutcome {
		err = &stageError{stage: stage, err: err}
		out.err, out.reusable, out.canQuit = err, false, false
		out.health, out.healthReason = HealthFailed, replyText(err)
		set(idx, queue.Pending, replyText(err))
		for _, i := range idx {
			out.failover[i] = failover
		}
		return out
	}
	// refused handles an SMTP reply that refuses a step for recipients idx.
	refused := func(se *smtp.SMTPError, idx []int) txOutcome {
		set(idx, stateFor(se), formatReply(se))
		out.reusable, out.canQuit = true, true
		if se.Code == 421 {
			// RFC 5321 section 3.8: the upstream is closing the connection.
			out.reusable, out.canQuit = false, false
			out.health, out.healthReason = HealthFailed, formatReply(se)
		}
		return out
	}
	all := make([]int, len(rcpts))
	for i := range all {
		all[i] = i
	}

	opts := &smtp.MailOptions{Size: body.Size(), UTF8: !isASCII(from)}
	for _, r := range rcpts {
		opts.UTF8 = opts.UTF8 || !isASCII(r)
	}
	if err := c.Mail(from, opts); err != nil {
		var se *smtp.SMTPError
		if !errors.As(err, &se) {
			return broken("mail", err, all, true)
		}
		if se.Code == 530 {
			// Authentication required (RFC 4954 section 6): our
			// configuration, not the message's.
			set(all, queue.Pending, formatReply(se))
			out.canQuit = true
			out.health, out.healthReason = HealthMisconfigured, formatReply(se)
			return out
		}
		out.health = HealthOK
		return refused(se, all)
	}
	out.health = HealthOK

	var accepted []int
	for i, r := range rcpts {
		err := c.Rcpt(r, nil)
		if err == nil {
			accepted = append(accepted, i)
			continue
		}
		var se *smtp.SMTPError
		if !errors.As(err, &se) {
			// Without a connection nothing more is decided: the accepted
			// recipients and the rest stay pending.
			return broken("rcpt", err, append(accepted, all[i:]...), true)
		}
		if se.Code == 421 {
			return refused(se, append(accepted, all[i:]...))
		}
		set([]int{i}, stateFor(se), formatReply(se))
	}
	if len(accepted) == 0 {
		out.reusable, out.canQuit = true, true
		return out
	}

	// From DATA on the upstream may take the message: cancellation no
	// longer closes the connection, since a message cut off half-way is
	// worse than a late one. Deadlines still bound every step.
	if !uc.detach() {
		broken("interrupted", errors.New("cancelled before DATA"), accepted, true)
		out.health, out.healthReason = HealthNone, ""
		return out
	}
	w, err := c.Data()
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			return refused(se, accepted)
		}
		return broken("data", err, accepted, true)
	}
	// The client sets no deadline while the message is written.
	_ = uc.raw.SetDeadline(time.Now().Add(d.dataTimeout()))
	src := &sourceReader{r: body.Reader()}
	if _, err := io.Copy(w, src); err != nil {
		if src.err != nil {
			// Our copy of the message failed to read: the final dot must
			// not go out after a part of it, so the connection is dropped
			// without QUIT. Not the upstream's failure, and another one
			// would read the same file: the attempt is retried later.
			out.err = &stageError{stage: "data", err: src.err}
			out.reusable, out.canQuit = false, false
			set(accepted, queue.Pending, errContentUnreadable)
			for _, i := range accepted {
				out.failover[i] = false
			}
			return out
		}
		// The final dot has not gone out: the upstream cannot have taken
		// the message.
		return broken("data", err, accepted, true)
	}
	resp, err := w.CloseWithResponse()
	out.dataSent = true
	if err != nil {
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			return refused(se, accepted)
		}
		// The upstream may or may not have taken it (RFC 1047). Another
		// upstream now would likely make a duplicate; giving up risks a
		// loss: retry later.
		return broken("end of data", err, accepted, false)
	}
	set(accepted, queue.Delivered, "250 "+oneLine(resp.StatusText))
	out.reusable, out.canQuit = true, true
	return out
}

// errContentUnreadable is the reply recorded when a message's content
// could not be read while it was sent, as the queue records one it cannot
// open.
const errContentUnreadable = "local error: message content unreadable"

// sourceReader passes reads through and keeps the first error other than
// io.EOF, so that a failure to read the message is told apart from one
// to send it.
type sourceReader struct {
	r   io.Reader
	err error
}

func (s *sourceReader) Read(p []byte) (int, error) {
	n, err := s.r.Read(p)
	if err != nil && err != io.EOF && s.err == nil {
		s.err = err
	}
	return n, err
}

// stateFor maps a reply to a recipient state: 5xx is permanent, anything
// else (4xx, or a code outside the standard classes) is retried.
func stateFor(se *smtp.SMTPError) queue.RcptState {
	if se.Code/100 == 5 {
		return queue.Failed
	}
	return queue.Pending
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}
