package upstream

import (
	"context"
	"net"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/mailproto"
	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/queue"
)

// fakeClock is a Deliverer.Now that moves only when told.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

var busy = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Busy"}

func TestUpstreamDownAndUp(t *testing.T) {
	a := smtptest.Start(t, smtptest.Options{GreetReply: busy})
	b := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b))
	clock := newFakeClock()
	env.d.Now = clock.Now
	env.d.DownAfter = 2
	env.d.DownFor = 30 * time.Second
	env.d.MaxDownFor = 50 * time.Second

	send := func(rcpt string) {
		t.Helper()
		res := deliver(t, env.d, testMessage("app@example.com", rcpt), deliverBody)
		checkResult(t, res[0], rcpt, queue.Delivered, "250 ", "b")
	}
	send("r1@example.net")
	if st := stateOf(t, env.d, "a"); !st.Up || st.ConsecutiveFailures != 1 || st.LastError != "421 4.3.2 Busy" {
		t.Fatalf("after one failure: %+v", st)
	}
	send("r2@example.net")
	st := stateOf(t, env.d, "a")
	if st.Up || !st.Since.Equal(clock.Now()) || !st.DownUntil.Equal(clock.Now().Add(30*time.Second)) || st.Failures != 2 {
		t.Fatalf("after DownAfter failures: %+v", st)
	}
	if n := strings.Count(env.log.String(), `msg="upstream down" upstream=a`); n != 1 {
		t.Errorf("%d down lines, want 1:\n%s", n, env.log.String())
	}

	// Down: left out without a connection.
	clock.Advance(29 * time.Second)
	send("r3@example.net")
	if got := a.Connections(); got != 2 {
		t.Errorf("a has %d connections while down, want 2", got)
	}

	// The probe fails: down again, for twice as long (capped).
	clock.Advance(time.Second)
	send("r4@example.net")
	if got := a.Connections(); got != 3 {
		t.Errorf("a has %d connections after the probe, want 3", got)
	}
	st = stateOf(t, env.d, "a")
	if st.Up || !st.DownUntil.Equal(clock.Now().Add(50*time.Second)) {
		t.Fatalf("after a failed probe: %+v", st)
	}
	downSince := st.Since

	// The probe succeeds: up again.
	a.SetGreetReply(nil)
	clock.Advance(50 * time.Second)
	res := deliver(t, env.d, testMessage("app@example.com", "r5@example.net"), deliverBody)
	checkResult(t, res[0], "r5@example.net", queue.Delivered, "250 ", "a")
	st = stateOf(t, env.d, "a")
	if !st.Up || st.ConsecutiveFailures != 0 || !st.DownUntil.IsZero() || !st.Since.Equal(clock.Now()) || st.Failures != 3 {
		t.Fatalf("after a successful probe: %+v", st)
	}
	wantUp := `msg="upstream up" upstream=a down_for=` + clock.Now().Sub(downSince).String()
	if !strings.Contains(env.log.String(), wantUp) {
		t.Errorf("log lacks %q:\n%s", wantUp, env.log.String())
	}

	// A later failure starts the count afresh, and a new down lasts
	// DownFor again. A 421 to MAIL counts as well: the upstream is
	// closing the connection.
	a.SetMailReply(func(string) *smtp.SMTPError { return busy })
	send("r6@example.net")
	send("r7@example.net")
	if st := stateOf(t, env.d, "a"); st.Up || !st.DownUntil.Equal(clock.Now().Add(30*time.Second)) {
		t.Errorf("down again: %+v", st)
	}
}

func TestAllUpstreamsDown(t *testing.T) {
	a := smtptest.Start(t, smtptest.Options{GreetReply: busy})
	b := smtptest.Start(t, smtptest.Options{GreetReply: busy})
	env := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b))
	clock := newFakeClock()
	env.d.Now = clock.Now
	env.d.DownAfter = 1
	setRoutes(env.d, append([]Route{{FromDomain: "only-a.example", Upstreams: []string{"a"}}}, env.d.Config().Routes...)...)

	res := deliver(t, env.d, testMessage("app@only-a.example", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Pending, "421 4.3.2 Busy", "a")
	clock.Advance(10 * time.Second)
	res = deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Pending, "421 4.3.2 Busy", "b")
	if !res[0].NotBefore.IsZero() {
		t.Errorf("NotBefore %v after b was tried", res[0].NotBefore)
	}

	conns := a.Connections() + b.Connections()
	res = deliver(t, env.d, testMessage("app@example.com", "x@example.net", "y@example.net"), deliverBody)
	for i, rcpt := range []string{"x@example.net", "y@example.net"} {
		// a comes back first.
		checkResult(t, res[i], rcpt, queue.Pending, "all upstreams down", "a")
		if !res[i].NotBefore.IsZero() {
			t.Errorf("NotBefore %v: an outage is a deferral with backoff, not pacing", res[i].NotBefore)
		}
	}
	if got := a.Connections() + b.Connections(); got != conns {
		t.Errorf("%d connections to down upstreams, was %d", got, conns)
	}
}

func TestUpstreamSingleProbe(t *testing.T) {
	a := smtptest.Start(t, smtptest.Options{GreetReply: busy})
	b := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b))
	clock := newFakeClock()
	env.d.Now = clock.Now
	env.d.DownAfter = 1

	res := deliver(t, env.d, testMessage("app@example.com", "r1@example.net"), deliverBody)
	checkResult(t, res[0], "r1@example.net", queue.Delivered, "250 ", "b")

	// a recovers, but answers the probe's MAIL only when told.
	entered := make(chan struct{})
	proceed := make(chan struct{})
	var once sync.Once
	a.SetMailReply(func(string) *smtp.SMTPError {
		once.Do(func() { close(entered) })
		<-proceed
		return nil
	})
	a.SetGreetReply(nil)
	clock.Advance(time.Minute)
	probe := make(chan []queue.Result)
	go func() {
		probe <- env.d.Deliver(context.Background(), testMessage("app@example.com", "r2@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	<-entered

	// While the probe is in flight, other deliveries still leave a out.
	res = deliver(t, env.d, testMessage("app@example.com", "r3@example.net"), deliverBody)
	checkResult(t, res[0], "r3@example.net", queue.Delivered, "250 ", "b")
	if got := a.Connections(); got != 2 {
		t.Errorf("a has %d connections during the probe, want 2", got)
	}
	close(proceed)
	res = <-probe
	checkResult(t, res[0], "r2@example.net", queue.Delivered, "250 ", "a")
	if !stateOf(t, env.d, "a").Up {
		t.Errorf("a still down after a successful probe")
	}
}

func TestSkipResult(t *testing.T) {
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	downA := skip{upstream: "a", reply: "upstream a is down", until: t0.Add(time.Minute), down: true}
	downB := skip{upstream: "b", reply: "upstream b is down", until: t0.Add(30 * time.Second), down: true}
	rateB := skip{upstream: "b", reply: "rate limit of b reached", until: t0.Add(time.Hour)}
	probing := skip{upstream: "b", reply: "upstream b is being probed", until: t0.Add(probeRetry)}
	tests := []struct {
		name  string
		skips []skip
		want  queue.Result
	}{
		{"all down", []skip{downA, downB},
			queue.Result{Reply: "all upstreams down", Upstream: "b"}},
		{"rate limited first", []skip{rateB, downA},
			queue.Result{Reply: "upstream a is down", Upstream: "a", NotBefore: downA.until}},
		{"only rate limited", []skip{rateB},
			queue.Result{Reply: "rate limit of b reached", Upstream: "b", NotBefore: rateB.until}},
		{"probe in flight", []skip{downA, probing},
			queue.Result{Reply: "upstream b is being probed", Upstream: "b", NotBefore: probing.until}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.want.Rcpt, tt.want.State = "x@example.net", queue.Pending
			if got := skipResult("x@example.net", tt.skips); !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestProbeNow(t *testing.T) {
	a := smtptest.Start(t, smtptest.Options{GreetReply: busy})
	env := newDeliverer(t, plainUpstream("a", a))
	clock := newFakeClock()
	env.d.Now = clock.Now
	env.d.DownAfter = 1
	deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	conns := a.Connections()
	deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	if a.Connections() != conns {
		t.Fatal("a down upstream was tried")
	}
	a.SetGreetReply(nil)
	env.d.ProbeNow()
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	if res[0].State != queue.Delivered {
		t.Fatalf("after ProbeNow: %+v", res[0])
	}
	if st := env.d.UpstreamStates()[0]; !st.Up {
		t.Errorf("still down after a successful probe: %+v", st)
	}
}

func TestDeliverAuthRefusedMarksDown(t *testing.T) {
	pki := testpki.New(t)
	a := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: "changed"})
	b := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t,
		Upstream{Name: "a", Address: a.Addr(), TLS: mailproto.TLSImplicit, RootCAs: pki.CAPool, Username: upUser, Password: upPass},
		plainUpstream("b", b))

	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "b")
	st := stateOf(t, env.d, "a")
	if st.Up || !strings.HasPrefix(st.LastError, "535 ") || st.DownUntil.IsZero() || st.Failures != 1 {
		t.Errorf("after a refused AUTH, state of a: %+v", st)
	}
	if !stateOf(t, env.d, "b").Up {
		t.Errorf("b reported down")
	}
	logs := env.log.String()
	if !strings.Contains(logs, `msg="upstream down" upstream=a reason="535 `) {
		t.Errorf("no down line for a:\n%s", logs)
	}

	conns := a.Connections()
	res = deliver(t, env.d, testMessage("app@example.com", "y@example.net"), deliverBody)
	checkResult(t, res[0], "y@example.net", queue.Delivered, "250 ", "b")
	if got := a.Connections(); got != conns {
		t.Errorf("a down, yet connected to: %d connections, was %d", got, conns)
	}
	if got := len(a.AuthAttempts()); got != 1 {
		t.Errorf("%d AUTH attempts on a, want 1", got)
	}
	if got := len(b.WaitMessages(t, 2, 5*time.Second)); got != 2 {
		t.Errorf("b got %d messages", got)
	}
}

// TestLocalHealth drives one upstream's health alone, without a
// Deliverer: down after DownAfter failures, one probe at a time, a longer
// down period after a failed probe, ProbeNow, and up again.
func TestLocalHealth(t *testing.T) {
	ctx := context.Background()
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	p := HealthPolicy{DownAfter: 2, DownFor: 10 * time.Second, MaxDownFor: time.Minute}
	h := &localHealth{}
	admit := func(now time.Time, wantProbe, wantDown bool) {
		t.Helper()
		probe, st, err := h.Admit(ctx, now)
		if err != nil || probe != wantProbe || st.Down != wantDown {
			t.Fatalf("Admit at %v: probe %v, %+v, %v; want probe %v, down %v", now.Sub(t0), probe, st, err, wantProbe, wantDown)
		}
	}
	fail := func(now time.Time, probe bool) HealthStatus {
		t.Helper()
		_, after, err := h.Report(ctx, now, HealthReport{Event: HealthFailed, Reason: "421 busy", Probe: probe, Policy: p})
		if err != nil {
			t.Fatal(err)
		}
		return after
	}

	admit(t0, false, false)
	if st := fail(t0, false); st.Down || st.Failures != 1 || st.LastError != "421 busy" {
		t.Fatalf("after one failure: %+v", st)
	}
	if st := fail(t0, false); !st.Down || !st.DownUntil.Equal(t0.Add(10*time.Second)) || !st.Since.Equal(t0) {
		t.Fatalf("after two: %+v", st)
	}
	admit(t0.Add(5*time.Second), false, true)
	// The down period over: one probe, the others still left out.
	admit(t0.Add(10*time.Second), true, true)
	admit(t0.Add(10*time.Second), false, true)
	if st := fail(t0.Add(11*time.Second), true); !st.DownUntil.Equal(t0.Add(31*time.Second)) || !st.Since.Equal(t0) {
		t.Fatalf("after a failed probe: %+v", st)
	}
	if err := h.ProbeNow(ctx, t0.Add(12*time.Second)); err != nil {
		t.Fatal(err)
	}
	admit(t0.Add(12*time.Second), true, true)
	before, after, err := h.Report(ctx, t0.Add(13*time.Second), HealthReport{Event: HealthOK, Probe: true, Policy: p})
	if err != nil || !before.Down || after.Down || after.Failures != 0 || !after.Since.Equal(t0.Add(13*time.Second)) {
		t.Fatalf("after a good probe: before %+v, after %+v, %v", before, after, err)
	}
	admit(t0.Add(13*time.Second), false, false)
	// A refused login takes it down at once, for DownFor again.
	_, after, _ = h.Report(ctx, t0.Add(14*time.Second), HealthReport{Event: HealthMisconfigured, Reason: "535", Policy: p})
	if !after.Down || !after.DownUntil.Equal(t0.Add(24*time.Second)) {
		t.Fatalf("after a refused login: %+v", after)
	}
}

// TestUpstreamStateUnknownUntilContact: an upstream is unknown until a
// delivery reaches it or fails to. One that refuses the connection, with
// no other upstream after it, is reported down at the first failure yet
// still tried by the next delivery; one that fails over to another stays
// up until DownAfter failures; a success makes it up again.
func TestUpstreamStateUnknownUntilContact(t *testing.T) {
	b := smtptest.Start(t, smtptest.Options{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused := ln.Addr().String()
	ln.Close() // nothing listens: connections are refused

	a := Upstream{Name: "a", Address: refused, TLS: mailproto.TLSNone}
	env := newDeliverer(t, a, plainUpstream("b", b))
	env.d.DownAfter = 3
	for _, name := range []string{"a", "b"} {
		if st := stateOf(t, env.d, name); st.State != StateUnknown || st.Up {
			t.Errorf("%s before any delivery: %+v, want unknown", name, st)
		}
	}

	// a, then b: a failed but the message went on to b.
	res := deliver(t, env.d, testMessage("app@example.com", "r1@example.net"), deliverBody)
	checkResult(t, res[0], "r1@example.net", queue.Delivered, "250 ", "b")
	if st := stateOf(t, env.d, "a"); st.State != StateUp || st.ConsecutiveFailures != 1 {
		t.Errorf("a after a failure with a way out: %+v, want up", st)
	}
	if st := stateOf(t, env.d, "b"); st.State != StateUp || !st.Up {
		t.Errorf("b after a delivery: %+v, want up", st)
	}

	// a alone: the message has no other way.
	env.d.SetConfig(testConfig(a))
	res = deliver(t, env.d, testMessage("app@example.com", "r2@example.net"), deliverBody)
	if res[0].State != queue.Pending {
		t.Fatalf("result %+v, want pending", res[0])
	}
	st := stateOf(t, env.d, "a")
	if st.State != StateDown || st.Up || !st.DownUntil.IsZero() || st.Attempts != 2 {
		t.Errorf("a after a failure with no way out: %+v, want down and still tried", st)
	}
	// Tried again: the third failure in a row leaves it out until a probe.
	deliver(t, env.d, testMessage("app@example.com", "r3@example.net"), deliverBody)
	if st := stateOf(t, env.d, "a"); st.Attempts != 3 || st.State != StateDown || st.DownUntil.IsZero() {
		t.Errorf("a after a third failure: %+v, want tried again and left out", st)
	}

	// Back: a listens again.
	up := smtptest.Start(t, smtptest.Options{Addr: refused})
	env.d.ProbeNow()
	res = deliver(t, env.d, testMessage("app@example.com", "r4@example.net"), deliverBody)
	checkResult(t, res[0], "r4@example.net", queue.Delivered, "250 ", "a")
	up.WaitMessages(t, 1, 5*time.Second)
	if st := stateOf(t, env.d, "a"); st.State != StateUp || !st.Up {
		t.Errorf("a after a delivery: %+v, want up", st)
	}
}
