package webhook

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"sync"
	"time"

	"smarthost/queue"
)

// ErrDispatcherClosed is returned by Run after Shutdown or Close.
var ErrDispatcherClosed = errors.New("webhook: dispatcher closed")

// Outbox is where the posts wait: the queue's storage (every
// queue.Backend is one).
type Outbox interface {
	// DueWebhooks takes up to limit posts due at now, oldest first, each
	// leased for hold: not due again before now+hold.
	DueWebhooks(now time.Time, hold time.Duration, limit int) ([]queue.WebhookPost, error)
	// WebhookDone removes a post; one already gone is no error.
	WebhookDone(id string) error
	// WebhookRetry counts a failed try of a post and makes it due at next.
	WebhookRetry(id string, next time.Time) error
	// WebhookBacklog counts the posts waiting and tells when the event of
	// the oldest happened (zero when none waits).
	WebhookBacklog() (n int, oldest time.Time, err error)
}

// Result is what became of one try of a post.
type Result string

// The results a Dispatcher reports.
const (
	Sent    Result = "sent"    // the endpoint answered 2xx
	Failed  Result = "failed"  // anything else; the post is tried again
	Dropped Result = "dropped" // given up: too old, or its endpoint is gone
)

// Results are every Result, for metrics to create their series.
func Results() []Result { return []Result{Sent, Failed, Dropped} }

// Observer is told the result of each try, for metrics. Calls come from
// the goroutine that made the try: they must be quick and safe for
// concurrent use.
type Observer interface {
	WebhookPosted(endpoint string, result Result)
}

// Defaults of a Dispatcher's fields, set by NewDispatcher.
const (
	DefaultConnectTimeout = 5 * time.Second
	DefaultRequestTimeout = 10 * time.Second
	DefaultConcurrency    = 4
	DefaultPoll           = time.Second
	// DefaultHold outlasts a request by far, so that a post in flight is
	// not taken again; a dispatcher that dies leaves its posts due again
	// after it.
	DefaultHold   = time.Minute
	DefaultGiveUp = 24 * time.Hour
)

// batch is how many posts one DueWebhooks call takes, and rounds how many
// calls one pass makes at most: posts of a busy endpoint are passed over
// (and leased), so that those behind them, for other endpoints, are
// reached.
const (
	batch  = 64
	rounds = 4
)

// maxAnswer is how much of an endpoint's answer is read, so that the
// connection can be reused and a huge answer is not.
const maxAnswer = 64 << 10

// NewClient is the HTTP client of a Dispatcher: connecting (TLS
// included) is bounded by 5 s and a whole request by 10 s, and redirects
// are not followed (Standard Webhooks counts a 3xx as a failure: the URL
// is to be changed instead).
func NewClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.DialContext = (&net.Dialer{Timeout: DefaultConnectTimeout, KeepAlive: 30 * time.Second}).DialContext
	t.TLSHandshakeTimeout = DefaultConnectTimeout
	t.MaxIdleConnsPerHost = DefaultConcurrency
	return &http.Client{
		Transport: t,
		Timeout:   DefaultRequestTimeout,
		CheckRedirect: func(*http.Request, []*http.Request) error {
			return http.ErrUseLastResponse
		},
	}
}

// Dispatcher posts the posts of an Outbox to their endpoints: at most
// Concurrency at a time to each, so that a slow or dead endpoint holds
// only its own share, retrying a failed post on the queue's schedule
// (RetryMin doubling up to RetryMax) until GiveUp after its event. Make
// one with NewDispatcher, change the fields you need, then call Run; do
// not change them afterwards.
type Dispatcher struct {
	Outbox    Outbox
	Endpoints []Endpoint
	Client    *http.Client // NewDispatcher sets NewClient()
	// Observer, if set, is told the result of each try.
	Observer Observer
	// Logger receives a line per failed or dropped post; a sent one at
	// debug level. NewDispatcher sets slog.Default().
	Logger *slog.Logger
	// RetryMin is the delay after the first failed try; it doubles with
	// each further one up to RetryMax. NewDispatcher sets 1m and 1h, the
	// queue's defaults.
	RetryMin, RetryMax time.Duration
	// GiveUp is how long after its event a post is tried; then it is
	// dropped. NewDispatcher sets 24h.
	GiveUp time.Duration
	// Concurrency bounds the posts in flight to one endpoint.
	// NewDispatcher sets 4.
	Concurrency int
	// Poll is how often the Outbox is asked for due posts when nothing
	// wakes the dispatcher sooner. NewDispatcher sets 1s.
	Poll time.Duration
	// Hold is how long a taken post is leased, longer than a request.
	// NewDispatcher sets 1m.
	Hold time.Duration
	// Now is the clock; Jitter spreads retries within ±25%, as the
	// queue's do. NewDispatcher sets time.Now and math/rand/v2.Float64.
	Now    func() time.Time
	Jitter func() float64

	wake     chan struct{}
	idle     chan struct{} // a post finished: its endpoint has a free slot
	stop     chan struct{}
	stopOnce sync.Once
	loopDone chan struct{}
	ctx      context.Context
	cancel   context.CancelFunc // cancels posts in flight
	wg       sync.WaitGroup     // posts in flight

	mu        sync.Mutex
	started   bool
	stopped   bool
	busy      map[string]int // posts in flight by endpoint
	waiting   map[string][]waitingPost
	endpoints map[string]*Endpoint
}

// NewDispatcher returns a Dispatcher of the posts of outbox to endpoints,
// its other fields set to their defaults.
func NewDispatcher(outbox Outbox, endpoints []Endpoint) *Dispatcher {
	ctx, cancel := context.WithCancel(context.Background())
	return &Dispatcher{
		Outbox:      outbox,
		Endpoints:   endpoints,
		Client:      NewClient(),
		Logger:      slog.Default(),
		RetryMin:    time.Minute,
		RetryMax:    time.Hour,
		GiveUp:      DefaultGiveUp,
		Concurrency: DefaultConcurrency,
		Poll:        DefaultPoll,
		Hold:        DefaultHold,
		Now:         time.Now,
		Jitter:      rand.Float64,
		wake:        make(chan struct{}, 1),
		idle:        make(chan struct{}, 1),
		stop:        make(chan struct{}),
		loopDone:    make(chan struct{}),
		ctx:         ctx,
		cancel:      cancel,
		busy:        map[string]int{},
		waiting:     map[string][]waitingPost{},
	}
}

// check reports a field that Run cannot work with.
func (d *Dispatcher) check() error {
	switch {
	case d.stop == nil:
		return errors.New("webhook: dispatcher not made by NewDispatcher")
	case d.Outbox == nil || d.Client == nil || d.Logger == nil || d.Now == nil || d.Jitter == nil:
		return errors.New("webhook: dispatcher without Outbox, Client, Logger, Now or Jitter")
	case d.RetryMin <= 0 || d.GiveUp <= 0 || d.Concurrency < 1 || d.Poll <= 0 || d.Hold <= 0:
		return fmt.Errorf("webhook: dispatcher needs RetryMin, GiveUp, Concurrency, Poll and Hold above zero (have %v, %v, %d, %v, %v)",
			d.RetryMin, d.GiveUp, d.Concurrency, d.Poll, d.Hold)
	case d.Client.Timeout <= 0 || d.Client.Timeout >= d.Hold:
		// A post still in flight when its lease ends would be taken again.
		return fmt.Errorf("webhook: dispatcher's Client.Timeout %v must be set and shorter than Hold %v", d.Client.Timeout, d.Hold)
	}
	return nil
}

// Wake makes Run look for due posts now, as after a commit that stored
// some; it never blocks.
func (d *Dispatcher) Wake() {
	select {
	case d.wake <- struct{}{}:
	default:
	}
}

// Run posts due posts until Shutdown or Close, then returns
// ErrDispatcherClosed.
func (d *Dispatcher) Run() error {
	if err := d.check(); err != nil {
		return err
	}
	d.mu.Lock()
	if d.stopped {
		d.mu.Unlock()
		return ErrDispatcherClosed
	}
	if d.started {
		d.mu.Unlock()
		return errors.New("webhook: dispatcher already running")
	}
	d.started = true
	d.endpoints = make(map[string]*Endpoint, len(d.Endpoints))
	for i := range d.Endpoints {
		d.endpoints[d.Endpoints[i].Name] = &d.Endpoints[i]
	}
	d.mu.Unlock()
	defer close(d.loopDone)

	timer := time.NewTimer(d.Poll)
	defer timer.Stop()
	for {
		d.step()
		timer.Reset(d.Poll)
		select {
		case <-d.stop:
			return ErrDispatcherClosed
		case <-d.wake:
		case <-d.idle:
		case <-timer.C:
		}
		timer.Stop()
	}
}

// step takes due posts while some endpoint has a free slot and starts
// those it can. A post whose endpoint is busy stays leased, due again
// after Hold.
func (d *Dispatcher) step() {
	// Taking posts is a write; counting them is not, and an idle relay
	// polls an empty outbox.
	if n, _, err := d.Outbox.WebhookBacklog(); err == nil && n == 0 {
		return
	}
	for range rounds {
		if !d.freeSlot() {
			return
		}
		now := d.Now()
		posts, err := d.Outbox.DueWebhooks(now, d.Hold, batch)
		if err != nil {
			d.Logger.Error("webhook: take due posts", "error", err)
			return
		}
		for _, p := range posts {
			d.start(p, now)
		}
		if len(posts) < batch {
			return
		}
	}
}

// freeSlot reports whether an endpoint could take one more post. A post
// for an endpoint no longer configured needs no slot, and is reached
// while any slot is free.
func (d *Dispatcher) freeSlot() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for name := range d.endpoints {
		if d.busy[name] < d.Concurrency {
			return true
		}
	}
	return len(d.endpoints) == 0
}

// start posts p in a goroutine of its own if its endpoint has a free
// slot, else puts it in the endpoint's waiting line, if there is room; a
// post that is past GiveUp, or whose endpoint is gone, is dropped. taken
// is when its lease began.
func (d *Dispatcher) start(p queue.WebhookPost, taken time.Time) {
	d.mu.Lock()
	ep := d.endpoints[p.Endpoint]
	switch {
	case ep == nil:
		d.mu.Unlock()
		d.drop(p, "no [[webhook]] of this name is configured")
		return
	case taken.Sub(p.At) > d.GiveUp:
		d.mu.Unlock()
		d.drop(p, "older than "+d.GiveUp.String())
		return
	case d.busy[p.Endpoint] >= d.Concurrency:
		// Left out of the line, it stays leased and is due again after
		// Hold.
		if len(d.waiting[p.Endpoint]) < batch {
			d.waiting[p.Endpoint] = append(d.waiting[p.Endpoint], waitingPost{p, taken})
		}
		d.mu.Unlock()
		return
	}
	d.busy[p.Endpoint]++
	d.wg.Add(1)
	d.mu.Unlock()
	go func() {
		defer d.wg.Done()
		for {
			d.post(*ep, p)
			var ok bool
			if p, ok = d.next(ep.Name); !ok {
				break
			}
		}
		select {
		case d.idle <- struct{}{}:
		default:
		}
	}()
}

// waitingPost is a post taken while its endpoint had no free slot.
type waitingPost struct {
	p     queue.WebhookPost
	taken time.Time
}

// next frees the slot of a post to endpoint that has finished, or hands
// it the next waiting post whose lease outlasts a request.
func (d *Dispatcher) next(endpoint string) (queue.WebhookPost, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	now := d.Now()
	for len(d.waiting[endpoint]) > 0 && d.ctx.Err() == nil {
		w := d.waiting[endpoint][0]
		d.waiting[endpoint] = d.waiting[endpoint][1:]
		if w.taken.Add(d.Hold).Sub(now) > d.Client.Timeout {
			return w.p, true
		}
	}
	d.busy[endpoint]--
	return queue.WebhookPost{}, false
}

// post makes one try of p and records its result.
func (d *Dispatcher) post(ep Endpoint, p queue.WebhookPost) {
	log := d.Logger.With("webhook", ep.Name, "webhook_id", p.ID, "queue_id", p.Data.QueueID, "event", string(p.Type))
	status, err := d.send(ep, p)
	if err == nil {
		if err := d.Outbox.WebhookDone(p.ID); err != nil {
			// Posted but not removed: it will be posted again, with the
			// same webhook-id, for the endpoint to recognise.
			log.Error("webhook: record sent post", "error", err)
		}
		d.observe(ep.Name, Sent)
		log.Debug("webhook sent", "status", status, "tries", p.Tries+1)
		return
	}
	if d.ctx.Err() != nil {
		// Stopped mid-request: not the endpoint's failure. The post stays
		// leased and is tried again after Hold.
		return
	}
	d.observe(ep.Name, Failed)
	tries := p.Tries + 1
	now := d.Now()
	next := now.Add(queue.Backoff(tries, d.RetryMin, max(d.RetryMax, d.RetryMin), d.Jitter()))
	if next.Sub(p.At) > d.GiveUp {
		log.Warn("webhook failed", "status", status, "error", err, "tries", tries)
		d.drop(p, "failing for "+d.GiveUp.String())
		return
	}
	log.Warn("webhook failed", "status", status, "error", err, "tries", tries, "next_try", next.Round(time.Second))
	if err := d.Outbox.WebhookRetry(p.ID, next); err != nil {
		log.Error("webhook: record failed post", "error", err)
	}
}

// send posts p to ep once. status is the endpoint's answer, 0 if none;
// err is nil for a 2xx.
func (d *Dispatcher) send(ep Endpoint, p queue.WebhookPost) (status int, err error) {
	body, err := Body(p)
	if err != nil {
		return 0, err
	}
	req, err := http.NewRequestWithContext(d.ctx, http.MethodPost, ep.URL, bytes.NewReader(body))
	if err != nil {
		return 0, urlFree(err)
	}
	ts := d.Now()
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "smarthost")
	req.Header.Set("webhook-id", p.ID)
	req.Header.Set("webhook-timestamp", strconv.FormatInt(ts.Unix(), 10))
	req.Header.Set("webhook-signature", Sign(ep.Key, p.ID, ts, body))
	resp, err := d.Client.Do(req)
	if err != nil {
		return 0, urlFree(err)
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, maxAnswer))
	resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return resp.StatusCode, fmt.Errorf("answered %s", resp.Status)
	}
	return resp.StatusCode, nil
}

// urlFree strips the URL from a client error: its path or query may hold
// a token, and the endpoint's name is logged instead.
func urlFree(err error) error {
	if ue, ok := errors.AsType[*url.Error](err); ok {
		return ue.Err
	}
	return err
}

// drop gives p up.
func (d *Dispatcher) drop(p queue.WebhookPost, why string) {
	d.Logger.Warn("webhook dropped", "webhook", p.Endpoint, "webhook_id", p.ID, "queue_id", p.Data.QueueID,
		"event", string(p.Type), "tries", p.Tries, "reason", why)
	if err := d.Outbox.WebhookDone(p.ID); err != nil {
		d.Logger.Error("webhook: record dropped post", "webhook", p.Endpoint, "webhook_id", p.ID, "error", err)
	}
	d.observe(p.Endpoint, Dropped)
}

func (d *Dispatcher) observe(endpoint string, r Result) {
	if d.Observer != nil {
		d.Observer.WebhookPosted(endpoint, r)
	}
}

// Shutdown stops taking posts and waits for those in flight. If ctx ends
// first, it cancels them (they stay leased, to be tried again after Hold)
// and returns ctx's error. Run returns ErrDispatcherClosed.
func (d *Dispatcher) Shutdown(ctx context.Context) error {
	d.mu.Lock()
	d.stopped = true
	started := d.started
	d.mu.Unlock()
	d.stopOnce.Do(func() { close(d.stop) })

	done := make(chan struct{})
	go func() {
		if started {
			<-d.loopDone // no post starts after the loop has returned
		}
		d.wg.Wait()
		close(done)
	}()
	select {
	case <-done:
		d.cancel()
		return nil
	case <-ctx.Done():
		d.cancel()
		<-done
		return ctx.Err()
	}
}

// Close stops the dispatcher at once, cancelling the posts in flight.
func (d *Dispatcher) Close() error {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := d.Shutdown(ctx); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}
