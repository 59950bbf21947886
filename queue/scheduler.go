package queue

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// ErrSchedulerClosed is returned by Run after Shutdown or Close.
var ErrSchedulerClosed = errors.New("queue: scheduler closed")

// DeliverFunc delivers m's Pending recipients (m.Pending()) and returns one
// Result per such recipient. A recipient without a Result stays Pending.
// body is the content, to be streamed (Body.Reader) rather than held, and
// valid until it returns. It must return soon after ctx is cancelled.
type DeliverFunc func(ctx context.Context, m Message, body Body) []Result

// BounceKind says why a DSN is asked for.
type BounceKind int

const (
	// BounceFailed asks for a DSN about recipients that failed for good:
	// refused permanently by an upstream, or expired at MaxAge.
	BounceFailed BounceKind = iota + 1
	// BounceDelayed asks for a delay warning about recipients still
	// pending after DelayWarning.
	BounceDelayed
)

func (k BounceKind) String() string {
	switch k {
	case BounceFailed:
		return "failed"
	case BounceDelayed:
		return "delayed"
	}
	return "unknown"
}

// BounceFunc builds a DSN for m about rcpts: the recipients that just
// failed, or for BounceDelayed those still pending, with their last reply.
// m is the message with this attempt's outcome applied; body is its
// content, whose Head holds the header section even when the rest could
// not be read. It returns nil to send none.
type BounceFunc func(kind BounceKind, m Message, rcpts []Recipient, body Body) (*Message, []byte)

// Scheduler claims due messages from Backend and delivers them with
// Deliver, at most Workers at a time, retrying with exponential backoff
// until every recipient is delivered or failed, or MaxAge has passed. While
// it runs, it is the Backend's Intake: a new message goes to a free worker
// from the commit that stores it. Make one with NewScheduler, change the
// fields you need, then call Run; do not change them afterwards.
type Scheduler struct {
	Backend Backend
	Deliver DeliverFunc
	// Workers bounds concurrent deliveries. NewScheduler sets 16.
	Workers int
	// RetryMin is the delay after the first attempt; it doubles with each
	// further attempt up to RetryMax (or RetryMin, if that is longer).
	// NewScheduler sets 1m and 1h.
	RetryMin, RetryMax time.Duration
	// MaxAge is how long a message may stay queued; after an attempt past
	// it, the recipients still pending fail as expired. NewScheduler sets
	// 120h.
	MaxAge time.Duration
	// Now is the clock. NewScheduler sets time.Now.
	Now func() time.Time
	// Jitter returns a value in [0,1) that spreads retries within ±25%.
	// NewScheduler sets math/rand/v2.Float64.
	Jitter func() float64
	// Logger receives one line per delivery attempt. NewScheduler sets
	// slog.Default().
	Logger *slog.Logger
	// OnDone, if set, is called once a message has no Pending recipient
	// left, after it was removed from the store.
	OnDone func(m Message)
	// Bounce, if set, builds the DSNs: at the end of an attempt in which
	// recipients failed for good (one DSN about them all), and for a delay
	// warning. The DSN is stored in the transaction that records the
	// attempt, so a crash neither loses nor repeats it. It is never asked
	// for a null sender or for a DSN (RFC 3461 section 6.2), and whatever
	// it returns is marked DSN.
	Bounce BounceFunc
	// HistoryRetention is how long the backend keeps the history of a
	// message that left the queue; Run removes it after that.
	HistoryRetention time.Duration
	// DelayWarning, if positive, is the age after which an attempt that
	// leaves recipients pending asks Bounce for one BounceDelayed warning
	// per message. 0 turns warnings off.
	DelayWarning time.Duration

	stop     chan struct{} // closed by Shutdown/Close
	stopOnce sync.Once
	loopDone chan struct{} // closed when Run's loop has returned
	idle     chan struct{} // a worker finished: capacity or a message is free again
	ctx      context.Context
	cancel   context.CancelFunc // cancels in-flight deliveries
	wg       sync.WaitGroup     // workers

	mu       sync.Mutex
	started  bool
	stopped  bool
	inflight map[string]struct{} // attempts running, and messages a Put is storing for a worker (Reserve)

	steps atomic.Int64 // scheduling passes; tests check the loop does not spin
}

const (
	defaultWorkers  = 16
	defaultRetryMin = time.Minute
	defaultRetryMax = time.Hour
	defaultMaxAge   = 120 * time.Hour

	// storeErrorDelay spaces scheduling passes while the store fails.
	storeErrorDelay = time.Second
)

// NewScheduler returns a Scheduler that delivers the messages of b with
// deliver, its other fields set to their defaults.
func NewScheduler(b Backend, deliver DeliverFunc) *Scheduler {
	ctx, cancel := context.WithCancel(context.Background())
	return &Scheduler{
		Backend:  b,
		Deliver:  deliver,
		Workers:  defaultWorkers,
		RetryMin: defaultRetryMin,
		RetryMax: defaultRetryMax,
		MaxAge:   defaultMaxAge,
		Now:      time.Now,
		Jitter:   rand.Float64,
		Logger:   slog.Default(),
		stop:     make(chan struct{}),
		loopDone: make(chan struct{}),
		idle:     make(chan struct{}, 1),
		ctx:      ctx,
		cancel:   cancel,
		inflight: make(map[string]struct{}),
	}
}

// check reports a field that Run cannot work with.
func (s *Scheduler) check() error {
	switch {
	case s.stop == nil:
		return errors.New("queue: scheduler not made by NewScheduler")
	case s.Backend == nil || s.Deliver == nil:
		return errors.New("queue: scheduler without Backend or Deliver")
	case s.Workers < 1 || s.RetryMin <= 0 || s.MaxAge <= 0:
		return fmt.Errorf("queue: scheduler needs Workers, RetryMin and MaxAge above zero (have %d, %v, %v)", s.Workers, s.RetryMin, s.MaxAge)
	case s.Now == nil || s.Jitter == nil || s.Logger == nil:
		return errors.New("queue: scheduler without Now, Jitter or Logger")
	}
	return nil
}

// backoff is the delay before the next attempt after the n-th counted one.
func (s *Scheduler) backoff(n int) time.Duration {
	return Backoff(n, s.RetryMin, max(s.RetryMax, s.RetryMin), s.Jitter())
}

// start is how an attempt that starts now is recorded: retried after the
// backoff of its n-th counted attempt should its outcome never be.
func (s *Scheduler) start(now time.Time) Start {
	return Start{Now: now, Retry: func(n int) time.Time { return now.Add(s.backoff(n)) }}
}

// Backoff returns the delay before the next attempt after attempt number
// attempt (1 for the first): retryMin·2^(attempt-1), capped at retryMax,
// then scaled by 0.75+0.5·jitter, so a jitter in [0,1) keeps it within ±25%.
func Backoff(attempt int, retryMin, retryMax time.Duration, jitter float64) time.Duration {
	if retryMin <= 0 {
		return 0
	}
	d := retryMin
	for i := 1; i < attempt && d < retryMax; i++ {
		if d > retryMax/2 {
			d = retryMax // and avoid overflowing
			break
		}
		d *= 2
	}
	d = min(d, retryMax)
	jitter = min(max(jitter, 0), 1)
	return time.Duration(float64(d) * (0.75 + 0.5*jitter))
}

// Run delivers queued messages until Shutdown or Close, then returns
// ErrSchedulerClosed. Messages already due are started at once; the
// others at their NextAttempt; a Put wakes it immediately.
func (s *Scheduler) Run() error {
	if err := s.check(); err != nil {
		return err
	}
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return ErrSchedulerClosed
	}
	if s.started {
		s.mu.Unlock()
		return errors.New("queue: scheduler already running")
	}
	s.started = true
	s.mu.Unlock()
	defer close(s.loopDone)
	s.Backend.SetIntake(s) // Put may start first attempts on free workers
	defer s.Backend.SetIntake(nil)
	s.wg.Add(1) // Shutdown waits for the pruning as for a worker
	go s.pruneHistory()

	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		wait := s.step()
		if wait >= 0 {
			timer.Reset(wait)
		}
		select {
		case <-s.stop:
			timer.Stop()
			return ErrSchedulerClosed
		case <-s.Backend.Wake():
		case <-s.idle:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// step claims what it can and starts workers. It returns how long to
// sleep before the next pass, or -1 to wait for a Put or a worker.
func (s *Scheduler) step() time.Duration {
	s.steps.Add(1)
	s.mu.Lock()
	free := s.Workers - len(s.inflight)
	busy := make(map[string]struct{}, len(s.inflight))
	for id := range s.inflight {
		busy[id] = struct{}{}
	}
	s.mu.Unlock()
	if free <= 0 {
		return -1
	}

	skip := func(id string) bool { _, ok := busy[id]; return ok }
	c, err := s.Backend.Claim(s.ctx, s.start(s.Now()), free, skip)
	if err != nil {
		s.Logger.Error("queue: claiming due messages failed", "err", err)
		return storeErrorDelay
	}
	for _, id := range c.Unreadable {
		s.Logger.Error("queue: unreadable message left out of delivery", "queue_id", id)
	}
	for _, a := range c.Attempts {
		s.mu.Lock()
		s.inflight[a.Message.ID] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go s.work(a)
	}
	if len(c.Attempts) == free || c.Wake.IsZero() {
		return -1
	}
	return max(c.Wake.Sub(s.Now()), 0)
}

// Reserve implements Intake: it takes a free worker for message id, which
// a Put is storing, or reports there is none. The message counts as in
// flight from now on, so that no claim takes it between its commit and
// the start of its attempt.
func (s *Scheduler) Reserve(id string) (at Start, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stopped || s.Workers-len(s.inflight) <= 0 {
		return Start{}, false
	}
	s.inflight[id] = struct{}{}
	s.wg.Add(1) // Shutdown waits for the reservation as for a worker
	return s.start(s.Now()), true
}

// Enqueue implements Intake: it starts the attempt on the worker that
// Reserve took.
func (s *Scheduler) Enqueue(a Attempt) { go s.work(a) }

// Cancel implements Intake: it gives back the worker that Reserve took.
func (s *Scheduler) Cancel(id string) {
	s.mu.Lock()
	delete(s.inflight, id)
	s.mu.Unlock()
	s.wg.Done()
	s.signalIdle()
}

func (s *Scheduler) signalIdle() {
	select {
	case s.idle <- struct{}{}:
	default:
	}
}

// work runs one attempt on a claimed message and records its outcome,
// together with the DSNs that the outcome calls for.
func (s *Scheduler) work(a Attempt) {
	defer s.wg.Done()
	m := a.Message
	defer func() {
		s.mu.Lock()
		delete(s.inflight, m.ID)
		s.mu.Unlock()
		s.signalIdle()
	}()

	// A spooled message's file is opened here, by the worker, not by the
	// claim, and streamed by the delivery.
	body, closeBody, err := s.Backend.OpenBody(a)
	var results []Result
	if err != nil {
		s.Logger.Error("queue: reading message content failed",
			"queue_id", m.ID, "msg_id", m.MessageID, "err", err)
		results = unreadable(m, err) // body is the head, for a DSN
	} else {
		results = s.deliver(a, body)
	}
	now := s.Now().Round(0)

	// Work the outcome out on a copy first, to build the DSNs outside the
	// transaction; inside it, apply gives the same outcome again, since
	// only this worker changes the recipients of a claimed message.
	preview := m
	preview.Recipients = slices.Clone(m.Recipients)
	out := s.apply(&preview, results, now)
	dsns, warned := s.bounces(preview, out, body, now)
	closeBody()

	var final outcome
	// Not s.ctx: an outcome is recorded even when Shutdown's deadline
	// has cancelled the delivery.
	events := attemptEvents(preview, out, dsns, now)
	f, err := s.Backend.Finish(context.Background(), a, events, func(stored *Message) (bool, []DSN) {
		final = s.apply(stored, results, now)
		if warned {
			stored.Warned = true
		}
		return final.done, dsns
	})
	switch {
	case errors.Is(err, ErrNotFound):
		s.Logger.Info("queue: message deleted during delivery; outcome dropped",
			"queue_id", m.ID, "msg_id", m.MessageID)
		return
	case errors.Is(err, ErrClaimLost):
		s.Logger.Warn("queue: the claim on the message was lost during delivery; outcome dropped, it will be retried",
			"queue_id", m.ID, "msg_id", m.MessageID)
		return
	case err != nil:
		// The claim stays recorded: the message is retried at its
		// NextAttempt and counted as recovered after a restart.
		s.Logger.Error("queue: recording delivery outcome failed",
			"queue_id", m.ID, "msg_id", m.MessageID, "err", err)
		return
	}
	s.log(f.Message, final, now)
	for _, n := range dsns {
		s.Logger.Info("queue: dsn queued", "queue_id", n.Message.ID, "for_queue_id", m.ID,
			"msg_id", m.MessageID, "rcpts", len(n.Message.Recipients))
	}
	if f.Removed && s.OnDone != nil {
		s.done(f.Message)
	}
}

// unreadable is the outcome of an attempt whose content cannot be opened.
// Content lost for good is a permanent failure (or the message was
// deleted meanwhile, and Finish drops the outcome); any other error is
// retried.
func unreadable(m Message, err error) []Result {
	state, reply := Pending, "local error: message content unreadable"
	if errors.Is(err, fs.ErrNotExist) {
		state, reply = Failed, "local error: message content lost"
	}
	var out []Result
	for _, rcpt := range m.Pending() {
		out = append(out, Result{Rcpt: rcpt, State: state, Reply: reply})
	}
	return out
}

// bounces asks Bounce for the DSNs that the outcome out of an attempt on
// m calls for, and readies them for storing. warned reports that a delay
// warning was asked for, so that it is asked for once only, even when
// Bounce returned none.
func (s *Scheduler) bounces(m Message, out outcome, body Body, now time.Time) (dsns []DSN, warned bool) {
	// Never a DSN about a null sender's message or about a DSN: there is
	// nobody to send it to, and it could loop (RFC 3461 section 6.2).
	if s.Bounce == nil || m.From == "" || m.DSN {
		return nil, false
	}
	if len(out.newlyFailed) > 0 {
		if n, ok := s.bounce(BounceFailed, m, out.newlyFailed, body, now); ok {
			dsns = append(dsns, n)
		}
	}
	if !out.done && s.DelayWarning > 0 && !m.Warned && now.Sub(m.Received) >= s.DelayWarning {
		warned = true
		if n, ok := s.bounce(BounceDelayed, m, out.pending, body, now); ok {
			dsns = append(dsns, n)
		}
	}
	return dsns, warned
}

// bounce calls Bounce and makes what it returns a queued DSN, due now. A
// panic in Bounce is logged and sends no DSN.
func (s *Scheduler) bounce(kind BounceKind, m Message, rcpts []Recipient, body Body, now time.Time) (n DSN, ok bool) {
	defer func() {
		if p := recover(); p != nil {
			s.Logger.Error("queue: building a DSN panicked", "queue_id", m.ID, "msg_id", m.MessageID,
				"kind", kind.String(), "panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			ok = false
		}
	}()
	dsn, dsnBody := s.Bounce(kind, m, slices.Clone(rcpts), body)
	if dsn == nil {
		return DSN{}, false
	}
	if len(dsn.Recipients) == 0 {
		s.Logger.Error("queue: DSN without recipients dropped", "queue_id", m.ID, "msg_id", m.MessageID, "kind", kind.String())
		return DSN{}, false
	}
	d := *dsn
	d.Recipients = slices.Clone(dsn.Recipients)
	if d.ID == "" {
		d.ID = NewID()
	}
	d.Received, d.NextAttempt = now, now
	d.DSN = true
	d.Size = int64(len(dsnBody))
	d.Attempts, d.Paced, d.LastAttempt, d.LastReply = 0, 0, time.Time{}, ""
	d.Held, d.Warned = false, false
	for i := range d.Recipients {
		d.Recipients[i].State = Pending
		d.Recipients[i].Reply, d.Recipients[i].Upstream = "", ""
	}
	return DSN{Message: d, Body: slices.Clone(dsnBody), Kind: kind}, true
}

// done calls OnDone; a panic there is logged, not fatal.
func (s *Scheduler) done(m Message) {
	defer func() {
		if p := recover(); p != nil {
			s.Logger.Error("queue: OnDone panicked", "queue_id", m.ID, "msg_id", m.MessageID,
				"panic", fmt.Sprint(p), "stack", string(debug.Stack()))
		}
	}()
	s.OnDone(m)
}

// deliver calls Deliver, turning a panic into a temporary failure so that
// one bad message cannot stop the process.
func (s *Scheduler) deliver(a Attempt, body Body) (results []Result) {
	m := a.Message
	m.Recipients = slices.Clone(m.Recipients)
	ctx := s.ctx
	if lapsed := a.Lapsed(); lapsed != nil {
		// Another replica may take the message over: stop, and leave
		// the recipients not yet done pending.
		var cancel context.CancelFunc
		ctx, cancel = context.WithCancel(ctx)
		defer cancel()
		go func() {
			select {
			case <-lapsed:
				s.Logger.Warn("queue: attempt stopped: its lease lapsed", "queue_id", m.ID, "msg_id", m.MessageID)
				cancel()
			case <-ctx.Done():
			}
		}()
	}
	defer func() {
		if p := recover(); p != nil {
			s.Logger.Error("queue: delivery panicked", "queue_id", m.ID, "msg_id", m.MessageID,
				"panic", fmt.Sprint(p), "stack", string(debug.Stack()))
			results = nil
			for _, rcpt := range m.Pending() {
				results = append(results, Result{Rcpt: rcpt, State: Pending, Reply: "local error: delivery failed unexpectedly"})
			}
		}
	}()
	return s.Deliver(ctx, m, body)
}

// outcome summarises one attempt.
type outcome struct {
	done                        bool // no recipient pending: leave the queue
	delivered, failed, deferred int  // recipients by result of this attempt
	// newlyFailed are the recipients that became Failed in this attempt
	// (refused, or expired); pending those still Pending after it.
	newlyFailed, pending []Recipient
	// rcpts are the recipients that this attempt decided something for,
	// one log line each.
	rcpts []rcptOutcome
}

// rcptOutcome is what an attempt did for one recipient: delivered,
// deferred (paced included), bounced (refused for good) or expired.
type rcptOutcome struct {
	Recipient
	outcome Outcome
	relay   string
	paced   bool
	earlier []Result // the upstreams that failed over to the one that decided
}

// expire records that rc expired: its deferral in this attempt, if any,
// becomes the expiry.
func (out *outcome) expire(rc Recipient) {
	for i := range out.rcpts {
		if ro := &out.rcpts[i]; ro.outcome == OutcomeDeferred && ro.Addr == rc.Addr {
			ro.Recipient, ro.outcome = rc, OutcomeExpired
			return
		}
	}
	out.rcpts = append(out.rcpts, rcptOutcome{Recipient: rc, outcome: OutcomeExpired})
}

// apply records results on m and decides what happens to it next. It must
// be deterministic: Backend.Finish may call it more than once.
//
// A Pending result may carry NotBefore, an upstream's rate limit. When
// every recipient left pending by the attempt has one, the attempt failed
// only for pacing: it is counted in Paced, which keeps the backoff from
// growing (claim computes it from Attempts − Paced), and the next attempt
// is at the latest NotBefore, sooner or later than the backoff. Otherwise
// a NotBefore later than the backoff's NextAttempt replaces it.
func (s *Scheduler) apply(m *Message, results []Result, now time.Time) outcome {
	var out outcome
	used := make([]bool, len(m.Recipients))
	lastPending, lastAny := "", ""
	paced, unpaced := 0, 0
	var notBefore time.Time
	for _, r := range results {
		for i := range m.Recipients {
			rc := &m.Recipients[i]
			if used[i] || rc.State != Pending || rc.Addr != r.Rcpt {
				continue
			}
			used[i] = true
			rc.State, rc.Reply, rc.Upstream = r.State, r.Reply, r.Upstream
			ro := rcptOutcome{outcome: OutcomeDeferred, relay: r.Relay, paced: !r.NotBefore.IsZero(), earlier: r.Earlier}
			switch r.State {
			case Delivered:
				out.delivered++
				ro.outcome = OutcomeDelivered
			case Failed:
				out.failed++
				out.newlyFailed = append(out.newlyFailed, *rc)
				ro.outcome = OutcomeBounced
			default:
				rc.State = Pending
				out.deferred++
				if r.Reply != "" {
					lastPending = r.Reply
				}
				if r.NotBefore.IsZero() {
					unpaced++
				} else {
					paced++
					if r.NotBefore.After(notBefore) {
						notBefore = r.NotBefore.Round(0)
					}
				}
			}
			if r.Reply != "" {
				lastAny = r.Reply
			}
			ro.Recipient = *rc
			out.rcpts = append(out.rcpts, ro)
			break
		}
	}
	for i, rc := range m.Recipients {
		if rc.State == Pending && !used[i] {
			unpaced++ // no result at all: not a rate limit
		}
	}
	// The reply that explains why the message is still queued is the most
	// useful one to keep.
	if lastPending != "" {
		m.LastReply = lastPending
	} else if lastAny != "" {
		m.LastReply = lastAny
	}

	pending, failed := 0, 0
	for _, rc := range m.Recipients {
		switch rc.State {
		case Pending:
			pending++
		case Failed:
			failed++
		}
	}
	switch {
	case pending == 0 && failed == 0:
		out.done = true
	case pending == 0:
		out.done = true
	case now.Sub(m.Received) >= s.MaxAge:
		// Pacing does not stop the clock: a message never leaves the queue
		// later than MaxAge.
		for i := range m.Recipients {
			rc := &m.Recipients[i]
			if rc.State != Pending {
				continue
			}
			last := rc.Reply
			if last == "" {
				last = m.LastReply
			}
			rc.State = Failed
			rc.Reply = fmt.Sprintf("expired after %s in queue; last reply: %s", s.MaxAge, last)
			out.newlyFailed = append(out.newlyFailed, *rc)
			out.expire(*rc)
		}
		out.done = true
	case paced > 0 && unpaced == 0:
		m.Paced++
		m.NextAttempt = notBefore
		if m.NextAttempt.Before(now) {
			m.NextAttempt = now
		}
	default:
		// The backoff counts from the end of the attempt: one that outlasted
		// it (an upstream slow or silent until its timeout) is not retried
		// at once, back to back.
		if m.NextAttempt.Before(now) {
			m.NextAttempt = now.Add(m.NextAttempt.Sub(m.LastAttempt))
		}
		if notBefore.After(m.NextAttempt) {
			m.NextAttempt = notBefore
		}
	}
	if !out.done {
		for _, rc := range m.Recipients {
			if rc.State == Pending {
				out.pending = append(out.pending, rc)
			}
		}
	}
	return out
}

// log writes one line per recipient that the attempt decided something
// for, with that recipient's own reply: its message is the outcome
// (delivered, deferred, bounced, expired), what an operator greps for.
func (s *Scheduler) log(m Message, out outcome, now time.Time) {
	for _, ro := range out.rcpts {
		level := slog.LevelWarn
		if ro.outcome == OutcomeDelivered || ro.paced {
			level = slog.LevelInfo // waiting for an upstream's pace is normal
		}
		attrs := []slog.Attr{
			slog.String("queue_id", m.ID), slog.String("msg_id", m.MessageID), slog.String("user", m.User),
			slog.String("from", m.From), slog.String("rcpt", ro.Addr),
			slog.String("upstream", ro.Upstream), slog.String("relay", ro.relay), slog.String("reply", ro.Reply),
			slog.Int("attempt", m.Attempts), slog.Int64("delay_ms", now.Sub(m.Received).Milliseconds()),
		}
		if ro.outcome == OutcomeDeferred {
			attrs = append(attrs, slog.Time("next_attempt", m.NextAttempt))
		}
		s.Logger.LogAttrs(context.Background(), level, string(ro.outcome), attrs...)
	}
}

// Shutdown stops claiming messages and waits for in-flight deliveries to
// finish. If ctx ends first, it cancels them, waits for their outcome to be
// recorded (a cancelled recipient stays queued for a retry) and returns
// ctx's error. Run returns ErrSchedulerClosed.
func (s *Scheduler) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.stopped = true
	started := s.started
	s.mu.Unlock()
	s.stopOnce.Do(func() { close(s.stop) })

	done := make(chan struct{})
	go func() {
		if started {
			<-s.loopDone // no worker starts after the loop has returned
		}
		s.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		s.cancel()
		return nil
	case <-ctx.Done():
		s.cancel()
		<-done
		return ctx.Err()
	}
}

// Close stops the scheduler at once: it cancels in-flight deliveries and
// returns when their outcome is recorded.
func (s *Scheduler) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
