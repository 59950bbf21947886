package upstream

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/jackc/pgx/v5/pgxpool"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpg"
	"smarthost/internal/testwait"
	"smarthost/queue"
)

func TestMain(m *testing.M) { testpg.Main(m) }

// replica is one relay's view of the shared database: its own pool and
// its own Cluster.
type replica struct {
	pool    *pgxpool.Pool
	cluster *Cluster
}

// testLogger logs to a buffer that a failed test prints.
func testLogger(t *testing.T) (*slog.Logger, *logBuffer) {
	lb := &logBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("log:\n%s", lb.String())
		}
	})
	return slog.New(slog.NewTextHandler(lb, nil)), lb
}

func newReplica(t *testing.T, dsn, owner string, opts ClusterOptions) *replica {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger, _ = testLogger(t)
	}
	pool, err := pgxpool.New(context.Background(), dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	c, err := NewCluster(context.Background(), pool, owner, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close) // before the pool closes
	return &replica{pool: pool, cluster: c}
}

func newReplicas(t *testing.T, n int, opts ClusterOptions) []*replica {
	t.Helper()
	dsn := testpg.Shared(t).NewDatabase(t)
	var rs []*replica
	for i := range n {
		rs = append(rs, newReplica(t, dsn, fmt.Sprintf("replica-%d", i), opts))
	}
	return rs
}

// checkWindows fails if more than n of the sorted times fall within any
// window of per.
func checkWindows(t *testing.T, times []time.Time, n int, per time.Duration) {
	t.Helper()
	for i := 0; i+n < len(times); i++ {
		if d := times[i+n].Sub(times[i]); d < per {
			t.Errorf("%d sent within %v (from the %dth, at %v): more than %d in %v", n+1, d, i+1, times[i].Format("15:04:05.000000"), n, per)
		}
	}
}

// TestClusterRateWindowReplicas: three replicas hammering one upstream's
// window never send more than N in any window of Per together, and are
// not starved below the limit either.
func TestClusterRateWindowReplicas(t *testing.T) {
	t.Parallel()
	rs := newReplicas(t, 3, ClusterOptions{})
	rate := Rate{N: 30, Per: 2 * time.Second}
	const run = 6 * time.Second
	var (
		mu      sync.Mutex
		sent    []time.Time
		unsent  atomic.Int64
		waits   atomic.Int64
		ctx     = context.Background()
		start   = time.Now()
		stopped = start.Add(run)
		wg      sync.WaitGroup
	)
	for _, r := range rs {
		w := r.cluster.RateWindow("gmail")
		for range 6 {
			wg.Go(func() {
				for time.Now().Before(stopped) {
					rw, err := w.Take(ctx, time.Now(), rate)
					if err != nil {
						t.Error(err)
						return
					}
					if !rw.Taken {
						waits.Add(1)
						timer := time.NewTimer(min(rw.For, time.Until(stopped)))
						select {
						case <-timer.C:
						case <-rw.Changed:
						}
						timer.Stop()
						continue
					}
					time.Sleep(rand.N(20 * time.Millisecond)) // the transaction
					ok := rand.N(10) > 0                      // one in ten is not sent
					now := time.Now()
					if err := w.Release(ctx, now, rate, ok); err != nil {
						t.Error(err)
						return
					}
					if ok {
						mu.Lock()
						sent = append(sent, now)
						mu.Unlock()
					} else {
						unsent.Add(1)
					}
				}
			})
		}
	}
	wg.Wait()
	slices.SortFunc(sent, func(a, b time.Time) int { return a.Compare(b) })
	checkWindows(t, sent, rate.N, rate.Per)
	// The windows starting at 0, 2s and 4s are full, the fourth at 6s is
	// cut short: at least 90 with a little slack for the machine.
	t.Logf("%d sent, %d not sent, %d waits in %v", len(sent), unsent.Load(), waits.Load(), run)
	if len(sent) < 80 || len(sent) > 120 {
		t.Errorf("%d sent in %v at %d per %v", len(sent), run, rate.N, rate.Per)
	}
	if unsent.Load() == 0 {
		t.Error("no slot given back unsent")
	}
}

// TestClusterRateWindowUnsentFreesAtOnce: a slot given back unsent is free
// for another replica at once; one given back sent holds it for Per.
func TestClusterRateWindowUnsentFreesAtOnce(t *testing.T) {
	t.Parallel()
	rs := newReplicas(t, 2, ClusterOptions{})
	a, b := rs[0].cluster.RateWindow("a"), rs[1].cluster.RateWindow("a")
	ctx := context.Background()
	rate := Rate{N: 1, Per: time.Hour}
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

	if w, err := a.Take(ctx, t0, rate); err != nil || !w.Taken {
		t.Fatalf("first take: %+v %v", w, err)
	}
	// In flight on a: b waits, and cannot know for how long.
	if w, err := b.Take(ctx, t0.Add(time.Second), rate); err != nil || w.Taken || w.Exact || w.For != time.Hour || w.Changed == nil {
		t.Fatalf("take while in flight elsewhere: %+v %v", w, err)
	}
	if err := a.Release(ctx, t0.Add(2*time.Second), rate, false); err != nil {
		t.Fatal(err)
	}
	if w, err := b.Take(ctx, t0.Add(2*time.Second), rate); err != nil || !w.Taken {
		t.Fatalf("take after the unsent release: %+v %v", w, err)
	}
	sentAt := t0.Add(3*time.Second + 1500*time.Nanosecond) // kept rounded up to the µs
	if err := b.Release(ctx, sentAt, rate, true); err != nil {
		t.Fatal(err)
	}
	if w, err := a.Take(ctx, t0.Add(4*time.Second), rate); err != nil || w.Taken || !w.Exact || w.For != time.Hour-time.Second+2*time.Microsecond {
		t.Fatalf("take after the sent release: %+v %v", w, err)
	}
	if w, err := a.Take(ctx, sentAt.Add(time.Hour), rate); err != nil || !w.Taken {
		t.Fatalf("take an hour after: %+v %v", w, err)
	}
}

// TestClusterRateWindowDeadOwner: the in-flight slots of a replica that
// died lapse after the lease, while a live replica's are renewed.
func TestClusterRateWindowDeadOwner(t *testing.T) {
	t.Parallel()
	const lease = time.Second
	rs := newReplicas(t, 2, ClusterOptions{Lease: lease, Poll: 100 * time.Millisecond})
	live, dead := rs[0].cluster.RateWindow("a"), rs[1].cluster.RateWindow("a")
	ctx := context.Background()
	rate := Rate{N: 3, Per: time.Hour}
	now := time.Now()

	if w, err := live.Take(ctx, now, rate); err != nil || !w.Taken {
		t.Fatalf("live take: %+v %v", w, err)
	}
	held := time.Now()
	for i := range 2 {
		if w, err := dead.Take(ctx, now, rate); err != nil || !w.Taken {
			t.Fatalf("take %d of the replica that dies: %+v %v", i, w, err)
		}
	}
	rs[1].pool.Close() // dies without giving its slots back
	if w, err := live.Take(ctx, now, rate); err != nil || w.Taken || w.Exact {
		t.Fatalf("take while the dead replica's slots hold: %+v %v", w, err)
	}
	testwait.For(t, 10*lease, "the dead replica's slots lapse", func() bool {
		w, err := live.Take(ctx, time.Now(), rate)
		if err != nil {
			t.Fatal(err)
		}
		return w.Taken
	})
	if time.Since(held) < lease {
		t.Fatalf("a slot lapsed within %v, before its lease of %v", time.Since(held), lease)
	}
	// The live replica holds its first slot and one more: one free.
	time.Sleep(time.Until(held.Add(3 * lease)))
	if w, err := live.Take(ctx, time.Now(), rate); err != nil || !w.Taken {
		t.Fatalf("third slot: %+v %v", w, err)
	}
	if w, err := live.Take(ctx, time.Now(), rate); err != nil || w.Taken {
		t.Fatalf("the live replica's slots held for %v lapsed: %+v %v", time.Since(held), w, err)
	}
}

// TestClusterHealthShared: three replicas see one up/down state, and one
// probe among them.
func TestClusterHealthShared(t *testing.T) {
	t.Parallel()
	const lease = time.Second
	rs := newReplicas(t, 3, ClusterOptions{Lease: lease})
	var hs []Health
	for _, r := range rs {
		hs = append(hs, r.cluster.Health("a"))
	}
	ctx := context.Background()
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	policy := HealthPolicy{DownAfter: 2, DownFor: 30 * time.Second, MaxDownFor: time.Hour}
	failed := HealthReport{Event: HealthFailed, Reason: "421 4.3.2 Busy", Policy: policy}
	report := func(h Health, now time.Time, r HealthReport) HealthStatus {
		t.Helper()
		_, after, err := h.Report(ctx, now, r)
		if err != nil {
			t.Fatal(err)
		}
		return after
	}
	statusAll := func(want HealthStatus) {
		t.Helper()
		for i, h := range hs {
			st, err := h.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.Down != want.Down || !st.DownUntil.Equal(want.DownUntil) || !st.Since.Equal(want.Since) || st.Failures != want.Failures || st.LastError != want.LastError {
				t.Errorf("replica %d: %+v, want %+v", i, st, want)
			}
		}
	}
	// admitAll asks every replica at once, several times each, and returns
	// the replicas admitted as the probe.
	admitAll := func(now time.Time) []int {
		t.Helper()
		var (
			mu     sync.Mutex
			probes []int
			wg     sync.WaitGroup
		)
		for i, h := range hs {
			for range 4 {
				wg.Go(func() {
					probe, _, err := h.Admit(ctx, now)
					if err != nil {
						t.Error(err)
					}
					if probe {
						mu.Lock()
						probes = append(probes, i)
						mu.Unlock()
					}
				})
			}
		}
		wg.Wait()
		return probes
	}

	if st, err := hs[2].Status(ctx); err != nil || st.Down || st.Failures != 0 {
		t.Fatalf("never reported: %+v %v", st, err)
	}
	report(hs[0], at(0), failed)
	statusAll(HealthStatus{Failures: 1, LastError: "421 4.3.2 Busy"})
	if st := report(hs[1], at(1), failed); !st.Down {
		t.Fatalf("two failures on two replicas: %+v", st)
	}
	down := HealthStatus{Down: true, DownUntil: at(31), Since: at(1), Failures: 2, LastError: "421 4.3.2 Busy"}
	statusAll(down)
	if p := admitAll(at(20)); len(p) != 0 {
		t.Fatalf("admitted as probe before DownUntil: %v", p)
	}
	p := admitAll(at(31))
	if len(p) != 1 {
		t.Fatalf("replicas %v admitted as the probe, want one", p)
	}
	prober := hs[p[0]]
	if again := admitAll(at(40)); len(again) != 0 {
		t.Fatalf("replicas %v admitted while %d probes", again, p[0])
	}
	// The probe succeeds: up for all.
	if st := report(prober, at(41), HealthReport{Event: HealthOK, Probe: true, Policy: policy}); st.Down {
		t.Fatalf("after a good probe: %+v", st)
	}
	statusAll(HealthStatus{Since: at(41), LastError: "421 4.3.2 Busy"})
	for i, h := range hs {
		if probe, st, err := h.Admit(ctx, at(42)); err != nil || probe || st.Down {
			t.Errorf("replica %d after the probe: %v %+v %v", i, probe, st, err)
		}
	}

	// Down again at once (a refused login); ProbeNow on one is seen by all.
	report(hs[0], at(50), HealthReport{Event: HealthMisconfigured, Reason: "535 5.7.8 No", Policy: policy})
	statusAll(HealthStatus{Down: true, DownUntil: at(80), Since: at(50), Failures: 1, LastError: "535 5.7.8 No"})
	if err := hs[2].ProbeNow(ctx, at(55)); err != nil {
		t.Fatal(err)
	}
	statusAll(HealthStatus{Down: true, DownUntil: at(55), Since: at(50), Failures: 1, LastError: "535 5.7.8 No"})
	p = admitAll(at(56))
	if len(p) != 1 {
		t.Fatalf("replicas %v admitted as the probe after ProbeNow, want one", p)
	}
	// A failed probe: down for twice as long, for all.
	report(hs[p[0]], at(57), HealthReport{Event: HealthFailed, Reason: "421 4.3.2 Busy", Probe: true, Policy: policy})
	statusAll(HealthStatus{Down: true, DownUntil: at(57 + 60), Since: at(50), Failures: 2, LastError: "421 4.3.2 Busy"})

	// A probe outlives its lease while its replica lives, and lapses once
	// the replica is gone.
	p = admitAll(at(117))
	if len(p) != 1 {
		t.Fatalf("replicas %v admitted as the probe, want one", p)
	}
	probing := time.Now()
	time.Sleep(2 * lease)
	if again := admitAll(at(118)); len(again) != 0 {
		t.Fatalf("replicas %v admitted while %d probes", again, p[0])
	}
	rs[p[0]].cluster.Close()
	others := slices.DeleteFunc([]int{0, 1, 2}, func(i int) bool { return i == p[0] })
	testwait.For(t, 10*lease, "the dead replica's probe lapses", func() bool {
		probe, _, err := hs[others[0]].Admit(ctx, at(119))
		if err != nil {
			t.Fatal(err)
		}
		return probe
	})
	if time.Since(probing) < 2*lease {
		t.Errorf("probe lapsed after %v", time.Since(probing))
	}
	if probe, _, err := hs[others[1]].Admit(ctx, at(119)); err != nil || probe {
		t.Errorf("a second replica admitted after the takeover: %v %v", probe, err)
	}
	// The late report of the replaced probe leaves the new probe in place.
	report(hs[p[0]], at(120), HealthReport{Event: HealthFailed, Reason: "421 4.3.2 Busy", Probe: true, Policy: policy})
	if probe, _, err := hs[others[1]].Admit(ctx, at(500)); err != nil || probe {
		t.Errorf("admitted while the new probe runs: %v %v", probe, err)
	}
}

// TestClusterDeliverersShareRateLimit: two Deliverers on one database
// send through one upstream within its rate limit together.
func TestClusterDeliverersShareRateLimit(t *testing.T) {
	t.Parallel()
	var (
		mu       sync.Mutex
		arrivals []time.Time
	)
	s := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
		mu.Lock()
		defer mu.Unlock()
		arrivals = append(arrivals, time.Now())
		return nil
	}})
	up := plainUpstream("a", s)
	up.RateLimit = Rate{N: 5, Per: 3 * time.Second}
	rs := newReplicas(t, 2, ClusterOptions{})
	var ds []*Deliverer
	for _, r := range rs {
		d := NewDeliverer()
		d.Hostname = "relay.test"
		d.Logger, _ = testLogger(t)
		d.MaxRateWait = time.Minute
		d.NewHealth, d.NewRateWindow = r.cluster.Health, r.cluster.RateWindow
		d.SetConfig(testConfig(up))
		t.Cleanup(d.Close)
		ds = append(ds, d)
	}

	const n = 12
	start := time.Now()
	results := make([][]queue.Result, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			m := testMessage("app@example.com", fmt.Sprintf("r%d@example.net", i))
			results[i] = ds[i%2].Deliver(context.Background(), m, queue.NewBody([]byte(deliverBody)))
		})
	}
	wg.Wait()
	took := time.Since(start)
	for i, res := range results {
		if len(res) != 1 || res[0].State != queue.Delivered {
			t.Errorf("message %d: %+v", i, res)
		}
	}
	mu.Lock()
	got := slices.Clone(arrivals)
	mu.Unlock()
	if len(got) != n {
		t.Fatalf("%d arrivals, want %d", len(got), n)
	}
	slices.SortFunc(got, func(a, b time.Time) int { return a.Compare(b) })
	checkWindows(t, got, up.RateLimit.N, up.RateLimit.Per)
	// 5 at once, 5 after 3s, 2 after 6s.
	if took < 6*time.Second || took > 20*time.Second {
		t.Errorf("12 messages at 5 per 3s took %v", took)
	}
}

// TestClusterDatabaseDown: while the database is down, a delivery through
// an upstream whose health or rate window is kept there is deferred,
// never bounced, and goes out once the database is back.
func TestClusterDatabaseDown(t *testing.T) {
	t.Parallel()
	pg := testpg.Start(t, testpg.Options{})
	logger, lb := testLogger(t)
	// No health cache: the first delivery would leave its upstream up
	// and clean in it, admitted for a while without the database.
	r := newReplica(t, pg.NewDatabase(t), "replica-0", ClusterOptions{Logger: logger, HealthCache: -1})
	s := smtptest.Start(t, smtptest.Options{})
	up := plainUpstream("a", s)
	up.RateLimit = Rate{N: 100, Per: time.Minute}

	both := NewDeliverer()
	both.NewHealth, both.NewRateWindow = r.cluster.Health, r.cluster.RateWindow
	windowOnly := NewDeliverer()
	windowOnly.NewRateWindow = r.cluster.RateWindow
	for _, d := range []*Deliverer{both, windowOnly} {
		d.Hostname = "relay.test"
		d.Logger = logger
		d.SetConfig(testConfig(up))
		t.Cleanup(d.Close)
	}
	res := deliver(t, both, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")

	if err := pg.Stop(); err != nil {
		t.Fatal(err)
	}
	for name, c := range map[string]struct {
		d     *Deliverer
		reply string
	}{
		"health":      {both, "health: shared upstream state unavailable"},
		"rate window": {windowOnly, "rate limit: shared upstream state unavailable"},
	} {
		res := deliver(t, c.d, testMessage("app@example.com", "y@example.net"), deliverBody)
		checkResult(t, res[0], "y@example.net", queue.Pending, c.reply, "a")
		if !res[0].NotBefore.IsZero() {
			t.Errorf("%s: NotBefore %v", name, res[0].NotBefore)
		}
		if strings.Contains(res[0].Reply, pg.SocketDir()) {
			t.Errorf("%s: reply %q names the socket", name, res[0].Reply)
		}
	}
	// The cause is in the log, for the operator.
	if l := lb.String(); !strings.Contains(l, "shared upstream state: health not read") || !strings.Contains(l, "shared upstream state: rate limit slot not taken") || !strings.Contains(l, pg.SocketDir()) {
		t.Errorf("no cause logged:\n%s", l)
	}
	if got := len(s.Messages()); got != 1 {
		t.Fatalf("upstream got %d messages while the database was down", got)
	}
	// The health of a is unknown, not down.
	if st := stateOf(t, both, "a"); !st.Up {
		t.Errorf("state while the database is down: %+v", st)
	}

	if err := pg.Restart(); err != nil {
		t.Fatal(err)
	}
	for _, d := range []*Deliverer{both, windowOnly} {
		res := deliver(t, d, testMessage("app@example.com", "z@example.net"), deliverBody)
		checkResult(t, res[0], "z@example.net", queue.Delivered, "250 ", "a")
	}
	if st := stateOf(t, both, "a"); !st.Up || st.ConsecutiveFailures != 0 {
		t.Errorf("state after the database is back: %+v", st)
	}
}

// TestClusterRateWindowReleaseRetried: a release that the database could
// not take is made when it is back, so the sent message still counts, and
// its slot stays in flight until then.
func TestClusterRateWindowReleaseRetried(t *testing.T) {
	t.Parallel()
	pg := testpg.Start(t, testpg.Options{})
	dsn := pg.NewDatabase(t)
	opts := ClusterOptions{Lease: 5 * time.Second} // outlives the outage
	a := newReplica(t, dsn, "replica-0", opts).cluster.RateWindow("a")
	b := newReplica(t, dsn, "replica-1", opts).cluster.RateWindow("a")
	ctx := context.Background()
	rate := Rate{N: 1, Per: time.Hour}
	t0 := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

	if w, err := a.Take(ctx, t0, rate); err != nil || !w.Taken {
		t.Fatalf("take: %+v %v", w, err)
	}
	if err := pg.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := a.Release(ctx, t0.Add(time.Second), rate, true); err == nil {
		t.Fatal("release while the database is down: no error")
	}
	if err := pg.Restart(); err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 10*time.Second, "the sent slot logged", func() bool {
		w, err := b.Take(ctx, t0.Add(2*time.Second), rate)
		switch {
		case err != nil:
			t.Log(err) // the pool reconnecting
			return false
		case w.Taken:
			t.Fatalf("slot taken before the release landed: %+v", w)
		}
		return w.Exact && w.For == time.Hour-time.Second
	})
}

// TestClusterHealthCache: an upstream last seen up without failures is
// admitted, and its successes taken, without the database for
// HealthCache, and no longer; everything else asks the database, which
// is down here.
func TestClusterHealthCache(t *testing.T) {
	t.Parallel()
	const bound = 4 * time.Second
	pg := testpg.Start(t, testpg.Options{})
	r := newReplica(t, pg.NewDatabase(t), "replica-0", ClusterOptions{HealthCache: bound})
	health := map[string]Health{}
	for _, name := range []string{"read", "written", "failing", "down", "probed"} {
		health[name] = r.cluster.Health(name)
	}
	ctx := context.Background()
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	policy := HealthPolicy{DownAfter: 3, DownFor: time.Minute}
	ok := HealthReport{Event: HealthOK, Policy: policy}
	failed := HealthReport{Event: HealthFailed, Reason: "421 4.3.2 Busy", Policy: policy}
	report := func(name string, r HealthReport) (HealthStatus, error) {
		_, after, err := health[name].Report(ctx, now, r)
		return after, err
	}
	must := func(st HealthStatus, err error) HealthStatus {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return st
	}

	start := time.Now()
	// Learnt from a read: never reported, so up and clean.
	if probe, st, err := health["read"].Admit(ctx, now); err != nil || probe || st.Down {
		t.Fatalf("admit: %v %+v %v", probe, st, err)
	}
	// Learnt from a write: a failure, then a success that clears it.
	must(report("written", failed))
	if st := must(report("written", ok)); st.Failures != 0 {
		t.Fatalf("after a success: %+v", st)
	}
	for _, name := range []string{"failing", "probed"} {
		if _, _, err := health[name].Admit(ctx, now); err != nil {
			t.Fatal(err)
		}
	}
	must(report("failing", failed))
	must(report("down", HealthReport{Event: HealthMisconfigured, Reason: "535 5.7.8 No", Policy: policy}))
	learnt := time.Now()

	if err := pg.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"read", "written"} {
		if probe, st, err := health[name].Admit(ctx, now); err != nil || probe || st.Down || st.Failures != 0 {
			t.Errorf("%s: admit from the cache: %v %+v %v", name, probe, st, err)
		}
		for _, ev := range []HealthEvent{HealthOK, HealthNone} {
			if before, after, err := health[name].Report(ctx, now, HealthReport{Event: ev, Policy: policy}); err != nil || before.Down || after.Down || after.Failures != 0 {
				t.Errorf("%s: report %v from the cache: %+v %+v %v", name, ev, before, after, err)
			}
		}
	}
	if _, _, err := health["failing"].Admit(ctx, now); err == nil {
		t.Error("an upstream with a failure admitted without the database")
	}
	if _, _, err := health["down"].Admit(ctx, now); err == nil {
		t.Error("a down upstream admitted without the database")
	}
	if _, err := report("probed", HealthReport{Event: HealthOK, Probe: true, Policy: policy}); err == nil {
		t.Error("a probe's report taken without the database")
	}
	if _, err := report("read", failed); err == nil {
		t.Error("a failure taken without the database")
	}
	// Unrecorded, the failure may be there or not: the database decides.
	if _, _, err := health["read"].Admit(ctx, now); err == nil {
		t.Error("admitted without the database after a failure it did not take")
	}
	if _, err := health["written"].Status(ctx); err == nil {
		t.Error("status without the database")
	}
	if err := health["written"].ProbeNow(ctx, now); err == nil {
		t.Error("ProbeNow without the database")
	}
	t.Logf("stopped and checked in %v", time.Since(start))
	if took := time.Since(start); took >= bound {
		t.Fatalf("the checks within the bound took %v, more than %v: too slow to tell", took, bound)
	}

	time.Sleep(time.Until(learnt.Add(bound)))
	if _, _, err := health["written"].Admit(ctx, now); err == nil {
		t.Errorf("admitted without the database %v after it was read", time.Since(learnt))
	}
	if _, err := report("written", ok); err == nil {
		t.Errorf("a success taken without the database %v after it was read", time.Since(learnt))
	}
}

// TestClusterHealthCacheReplicas: an upstream that one replica marks down
// is left out by another within HealthCache; by itself at once.
func TestClusterHealthCacheReplicas(t *testing.T) {
	t.Parallel()
	rs := newReplicas(t, 2, ClusterOptions{}) // HealthCache 1s
	const bound = time.Second
	a, b := rs[0].cluster.Health("x"), rs[1].cluster.Health("x")
	ctx := context.Background()
	now := time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)
	policy := HealthPolicy{DownFor: 30 * time.Second}

	for i, h := range []Health{a, b} {
		if probe, st, err := h.Admit(ctx, now); err != nil || probe || st.Down {
			t.Fatalf("replica %d: %v %+v %v", i, probe, st, err)
		}
	}
	if _, after, err := a.Report(ctx, now, HealthReport{Event: HealthMisconfigured, Reason: "535 5.7.8 No", Policy: policy}); err != nil || !after.Down {
		t.Fatalf("report: %+v %v", after, err)
	}
	marked := time.Now()
	if probe, st, err := a.Admit(ctx, now); err != nil || probe || !st.Down {
		t.Errorf("the replica that marked it down: %v %+v %v", probe, st, err)
	}
	// b may go on admitting it until the bound, and not after.
	time.Sleep(time.Until(marked.Add(bound)))
	if probe, st, err := b.Admit(ctx, now.Add(time.Second)); err != nil || probe || !st.Down || !st.DownUntil.Equal(now.Add(30*time.Second)) {
		t.Errorf("the other replica %v after: %v %+v %v", time.Since(marked), probe, st, err)
	}
	// Once due, one probe among them.
	due := now.Add(30 * time.Second)
	if probe, _, err := b.Admit(ctx, due); err != nil || !probe {
		t.Errorf("the other replica once due: %v %v", probe, err)
	}
	if probe, st, err := a.Admit(ctx, due); err != nil || probe || !st.Down {
		t.Errorf("a second probe: %v %+v %v", probe, st, err)
	}
	// A good probe: up for both at once, from what each wrote or read.
	if _, after, err := b.Report(ctx, due, HealthReport{Event: HealthOK, Probe: true, Policy: policy}); err != nil || after.Down {
		t.Fatalf("probe report: %+v %v", after, err)
	}
	for i, h := range []Health{a, b} {
		if probe, st, err := h.Admit(ctx, due); err != nil || probe || st.Down {
			t.Errorf("replica %d after the probe: %v %+v %v", i, probe, st, err)
		}
	}
}
