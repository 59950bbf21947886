package e2e

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpg"
	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

// sharedQueue is a PostgreSQL database that relays use as their queue.
type sharedQueue struct {
	server  *testpg.Server
	dsnFile string
}

// newSharedQueue makes a database on the server that the tests share,
// or, with own, on a server of the test's own that it may stop.
func newSharedQueue(t *testing.T, own bool) *sharedQueue {
	t.Helper()
	srv := testpg.Shared(t)
	if own {
		srv = testpg.Start(t, testpg.Options{})
	}
	q := &sharedQueue{server: srv, dsnFile: filepath.Join(t.TempDir(), "queue-dsn")}
	if err := os.WriteFile(q.dsnFile, []byte(srv.NewDatabase(t)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return q
}

// config is the [queue] lines that put a relay's queue in the database.
func (q *sharedQueue) config(extra string) string {
	return fmt.Sprintf("backend = \"postgres\"\ndsn_file = %q\nlease = \"5s\"\n%s", q.dsnFile, extra)
}

// startReplicas starts n relays on one shared queue, each with its own
// directory for its configuration and log.
func startReplicas(t *testing.T, n int, q *sharedQueue, rc relayConfig) (rs []*relay, configs []string) {
	t.Helper()
	rc.QueueExtra = q.config(rc.QueueExtra)
	for range n {
		rc.Dir = t.TempDir()
		cfg := writeConfig(t, rc)
		configs = append(configs, cfg)
		rs = append(rs, startRelay(t, cfg))
	}
	return rs, configs
}

// deliveredIDs counts the upstream's messages by the relay's queue ID.
func deliveredIDs(up *smtptest.Server) map[string]int {
	n := map[string]int{}
	for _, m := range up.Messages() {
		n[queueIDOf(m.Data)]++
	}
	return n
}

// waitDelivered waits until every ID in ids has reached up, for as long
// as deliveries keep arriving: it fails once none has for stall. A test
// that loads the machine drains at the machine's pace, not at a rate
// fixed in advance.
func waitDelivered(t *testing.T, up *smtptest.Server, ids []string, stall time.Duration) {
	t.Helper()
	var missing []string
	left, progress := len(ids)+1, time.Now()
	for {
		got := deliveredIDs(up)
		missing = missing[:0]
		for _, id := range ids {
			if got[id] == 0 {
				missing = append(missing, id)
			}
		}
		if len(missing) == 0 {
			return
		}
		if len(missing) < left {
			left, progress = len(missing), time.Now()
		}
		if time.Since(progress) > stall {
			t.Fatalf("%d of %d accepted messages not delivered, none for %s; first %v", len(missing), len(ids), stall, missing[:min(5, len(missing))])
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestClusterQueueShared (acceptance 4): three replicas on one database
// are one relay. `smarthost queue list` on any of them lists what the
// others accepted; a hold through one is honoured by all; a release
// through another lets it go.
func TestClusterQueueShared(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	var accept atomic.Bool
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword,
		RcptReply: func(string) *smtp.SMTPError {
			if accept.Load() {
				return nil
			}
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 7, 1}, Message: "Try again later"}
		}})
	q := newSharedQueue(t, false)
	rs, _ := startReplicas(t, 3, q, relayConfig{PKI: pki, UpstreamAddr: up.Addr()})

	var ids []string
	for i, r := range rs {
		s := connect(t, r.addr, pki)
		id, err := s.send("app@example.com", []string{"bob@example.net"}, fmt.Sprintf("Subject: via replica %d\r\n\r\nhello\r\n", i))
		s.close()
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	for i, r := range rs {
		cmd := exec.Command(binary, "queue", "-server", r.http, "-json", "list")
		cmd.Env = append(os.Environ(), "SMARTHOST_ADMIN_TOKEN="+adminToken)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("smarthost queue list on replica %d: %v\n%s", i, err, out)
		}
		for _, id := range ids {
			if !strings.Contains(string(out), `"id": "`+id+`"`) && !strings.Contains(string(out), `"id":"`+id+`"`) {
				t.Errorf("replica %d's queue list lacks %s, accepted by another replica:\n%s", i, id, out)
			}
		}
	}

	api(t, rs[1], http.MethodPost, "/api/queue/"+ids[0]+"/hold", nil)
	// An attempt in progress when the hold came finishes (a hold keeps the
	// message out of the next attempt): the upstream accepts only after.
	testwait.For(t, 30*time.Second, "the held message out of any attempt", func() bool {
		return !queueByID(t, rs[1])[ids[0]].InFlight
	})
	accept.Store(true)
	api(t, rs[2], http.MethodPost, "/api/queue/flush", nil)
	waitDelivered(t, up, ids[1:], 30*time.Second)
	// The others keep trying what is due; the held one stays.
	api(t, rs[0], http.MethodPost, "/api/queue/flush", nil)
	time.Sleep(3 * time.Second)
	if n := deliveredIDs(up)[ids[0]]; n != 0 {
		t.Fatalf("the message held through replica 1 was delivered %d times", n)
	}
	for i, r := range rs {
		if e := queueByID(t, r)[ids[0]]; !e.Held {
			t.Errorf("replica %d shows %s not held: %+v", i, ids[0], e)
		}
	}
	api(t, rs[0], http.MethodPost, "/api/queue/"+ids[0]+"/release", nil)
	waitDelivered(t, up, ids[:1], 30*time.Second)
	for id, n := range deliveredIDs(up) {
		if n != 1 {
			t.Errorf("%s delivered %d times", id, n)
		}
	}

	// The gauges report the whole queue; the database's pool is shown.
	for i, r := range rs {
		_, fams := scrapeMetrics(t, r)
		if v, ok := series(fams, "smarthost_queue_messages", map[string]string{"state": "queued"}); !ok || v != 0 {
			t.Errorf("replica %d: smarthost_queue_messages{state=queued} = %v (%v), want 0", i, v, ok)
		}
		if v, ok := series(fams, "smarthost_queue_db_max_connections", nil); !ok || v < 1 {
			t.Errorf("replica %d: smarthost_queue_db_max_connections = %v (%v)", i, v, ok)
		}
		if v, ok := series(fams, "smarthost_queue_db_acquires_total", nil); !ok || v < 1 {
			t.Errorf("replica %d: smarthost_queue_db_acquires_total = %v (%v)", i, v, ok)
		}
		if _, ok := series(fams, "smarthost_queue_lease_takeovers_total", nil); !ok {
			t.Errorf("replica %d: no smarthost_queue_lease_takeovers_total", i)
		}
	}
}

// TestClusterRateLimit (acceptance 3): three replicas share one
// upstream's rate_limit = "30/10s": in no 10 s does the upstream get
// more than 30 messages, and all arrive, none bounced.
func TestClusterRateLimit(t *testing.T) {
	t.Parallel() // a limit is an upper bound: a busy machine only slows it
	const total, limit, per = 70, 30, 10 * time.Second
	pki := testpki.New(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	q := newSharedQueue(t, false)
	rs, _ := startReplicas(t, 3, q, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), UpExtra: `rate_limit = "30/10s"`})

	var mu sync.Mutex
	var ids []string
	var wg sync.WaitGroup
	for i, r := range rs {
		wg.Go(func() {
			s := connect(t, r.addr, pki)
			defer s.close()
			for j := i; j < total; j += len(rs) {
				id, err := s.send("app@example.com", []string{fmt.Sprintf("r%d@example.net", j)}, fmt.Sprintf("Subject: %d\r\n\r\nrate\r\n", j))
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				ids = append(ids, id)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	waitDelivered(t, up, ids, 90*time.Second)

	msgs := up.Messages()
	var at []time.Time
	for _, m := range msgs {
		if m.From == "" {
			t.Errorf("a bounce reached the upstream: %q", m.Data)
		}
		at = append(at, m.Ended)
	}
	slices.SortFunc(at, func(a, b time.Time) int { return a.Compare(b) })
	most := 0
	for i := range at {
		n := 0
		for j := i; j < len(at) && at[j].Sub(at[i]) < per; j++ {
			n++
		}
		most = max(most, n)
	}
	t.Logf("%d messages over %s; at most %d in any %s", len(at), at[len(at)-1].Sub(at[0]).Round(time.Millisecond), most, per)
	if most > limit {
		t.Errorf("%d messages reached the upstream within %s, over the cluster's limit of %d", most, per, limit)
	}
	if len(msgs) != total {
		t.Errorf("%d messages delivered, want %d", len(msgs), total)
	}
}

// TestClusterDatabaseOutage (acceptance 5): the database stopped for
// 10 s under load. Submissions get 451 4.3.0, never 250, while it is
// down; /readyz answers 503 and then 200 again without a restart; every
// message that got 250 is delivered.
func TestClusterDatabaseOutage(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	q := newSharedQueue(t, true)
	rs, _ := startReplicas(t, 2, q, relayConfig{PKI: pki, UpstreamAddr: up.Addr()})

	var mu sync.Mutex
	var accepted []string
	refused := map[string]int{} // reply code and enhanced code → count
	var down atomic.Bool
	acceptedWhileDown := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for c := range 4 {
		r := rs[c%len(rs)]
		wg.Go(func() {
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				s, err := dialSubmitter(r.addr, pki)
				if err != nil {
					time.Sleep(50 * time.Millisecond)
					continue
				}
				for ; ; i++ {
					select {
					case <-stop:
						s.close()
						return
					default:
					}
					wasDown := down.Load()
					id, err := s.send("app@example.com", []string{"bob@example.net"}, fmt.Sprintf("Subject: outage %d/%d\r\n\r\nbody\r\n", c, i))
					mu.Lock()
					var se *smtp.SMTPError
					switch {
					case err == nil:
						accepted = append(accepted, id)
						if wasDown && down.Load() {
							acceptedWhileDown++
						}
					case errors.As(err, &se):
						refused[fmt.Sprintf("%d %d.%d.%d", se.Code, se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])]++
					}
					mu.Unlock()
					if err != nil {
						s.c.Reset()
						time.Sleep(50 * time.Millisecond)
					}
				}
			}
		})
	}
	var stopOnce sync.Once
	stopLoad := func() { stopOnce.Do(func() { close(stop); wg.Wait() }) }
	defer stopLoad()

	time.Sleep(2 * time.Second)
	if err := q.server.Stop(); err != nil {
		t.Fatal(err)
	}
	down.Store(true) // from here on, nothing can commit
	for i, r := range rs {
		testwait.For(t, 10*time.Second, fmt.Sprintf("replica %d's /readyz to answer 503", i), func() bool { return readyz(t, r) == http.StatusServiceUnavailable })
	}
	time.Sleep(10 * time.Second)
	down.Store(false)
	if err := q.server.Restart(); err != nil {
		t.Fatal(err)
	}
	for i, r := range rs {
		testwait.For(t, 20*time.Second, fmt.Sprintf("replica %d's /readyz to answer 200", i), func() bool { return readyz(t, r) == http.StatusOK })
	}
	time.Sleep(2 * time.Second)
	stopLoad()

	mu.Lock()
	defer mu.Unlock()
	t.Logf("accepted %d, refused %v", len(accepted), refused)
	if refused["451 4.3.0"] == 0 {
		t.Errorf("no submission got 451 4.3.0 while the database was down: %v", refused)
	}
	for reply := range refused {
		if reply != "451 4.3.0" {
			t.Errorf("submissions refused with %s", reply)
		}
	}
	if acceptedWhileDown > 0 {
		t.Errorf("%d messages got 250 while the database was down", acceptedWhileDown)
	}
	waitDelivered(t, up, accepted, 60*time.Second)
}

// TestClusterCrashLoop (acceptance 2): three replicas on one database,
// ten clients submitting for 30 s spread over them, one replica at a
// time SIGKILLed and started again, and an upstream that flaps between
// accepting and deferring. Every message that got 250 is delivered; a
// duplicate (a kill after the upstream took a message, before its
// outcome was committed) is counted and rare; and no two replicas ever
// deliver one message at the same time.
func TestClusterCrashLoop(t *testing.T) {
	// Beside the other tests: a busy machine accepts and drains fewer
	// messages, which changes none of what is checked.
	t.Parallel()
	const (
		clients = 10
		load    = 30 * time.Second
	)
	seed := crashLoopSeed(t)
	rng := rand.New(rand.NewPCG(seed, 14))
	pki := testpki.New(t)
	var flapDown atomic.Bool
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword,
		RcptReply: func(string) *smtp.SMTPError {
			if flapDown.Load() {
				return &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "Service not available"}
			}
			return nil
		}})
	q := newSharedQueue(t, false)
	rs, configs := startReplicas(t, 3, q, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), RetryMin: "500ms", RetryMax: "1s"})

	var addrMu sync.Mutex
	addrs := make([]string, len(rs))
	for i, r := range rs {
		addrs[i] = r.addr
	}
	pick := func() string {
		addrMu.Lock()
		defer addrMu.Unlock()
		live := slices.DeleteFunc(slices.Clone(addrs), func(a string) bool { return a == "" })
		if len(live) == 0 {
			return ""
		}
		return live[rand.IntN(len(live))]
	}

	var mu sync.Mutex
	accepted := map[string]bool{}
	sendErrors := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for c := range clients {
		wg.Go(func() {
			for i := 0; ; {
				select {
				case <-stop:
					return
				default:
				}
				addr := pick()
				if addr == "" {
					time.Sleep(20 * time.Millisecond)
					continue
				}
				s, err := dialSubmitter(addr, pki)
				if err != nil {
					continue
				}
				for n := 0; n < 20; n++ { // then another replica
					select {
					case <-stop:
						s.close()
						return
					default:
					}
					i++
					id, err := s.send("app@example.com", []string{"bob@example.net"}, fmt.Sprintf("Subject: cluster %d/%d\r\n\r\nbody\r\n", c, i))
					mu.Lock()
					if err != nil {
						sendErrors++
					} else {
						accepted[id] = true
					}
					mu.Unlock()
					if err != nil {
						break
					}
				}
				s.c.Close()
			}
		})
	}
	flapStop := make(chan struct{})
	flapDone := make(chan struct{})
	flapRNG := rand.New(rand.NewPCG(seed, 15)) // rng is the kill loop's
	go func() {
		defer close(flapDone)
		for {
			select {
			case <-flapStop:
				flapDown.Store(false)
				return
			case <-time.After(time.Duration(500+flapRNG.IntN(1500)) * time.Millisecond):
				flapDown.Store(!flapDown.Load())
			}
		}
	}()

	kills := 0
	deadline := time.Now().Add(load)
	for time.Now().Before(deadline) || kills < 10 {
		time.Sleep(time.Duration(1500+rng.IntN(1000)) * time.Millisecond)
		i := kills % len(rs)
		addrMu.Lock()
		addrs[i] = ""
		addrMu.Unlock()
		rs[i].kill()
		kills++
		rs[i] = startRelay(t, configs[i])
		addrMu.Lock()
		addrs[i] = rs[i].addr
		addrMu.Unlock()
	}
	close(stop)
	wg.Wait()
	close(flapStop)
	<-flapDone

	mu.Lock()
	ids := make([]string, 0, len(accepted))
	for id := range accepted {
		ids = append(ids, id)
	}
	mu.Unlock()
	if len(ids) < 200 {
		t.Fatalf("only %d messages accepted in %s: the load did not run", len(ids), load)
	}
	waitDelivered(t, up, ids, 60*time.Second)

	byID := map[string][]smtptest.Message{}
	for _, m := range up.Messages() {
		id := queueIDOf(m.Data)
		byID[id] = append(byID[id], m)
	}
	dups := 0
	for id, ms := range byID {
		dups += len(ms) - 1
		for i := range ms {
			for j := i + 1; j < len(ms); j++ {
				if ms[i].Began.Before(ms[j].Ended) && ms[j].Began.Before(ms[i].Ended) {
					t.Errorf("%s delivered twice at once: %s–%s and %s–%s", id,
						ms[i].Began.Format(time.StampMilli), ms[i].Ended.Format(time.StampMilli),
						ms[j].Began.Format(time.StampMilli), ms[j].Ended.Format(time.StampMilli))
				}
			}
		}
	}
	takeovers := 0.0
	for _, r := range rs {
		_, fams := scrapeMetrics(t, r)
		v, _ := series(fams, "smarthost_queue_lease_takeovers_total", nil)
		takeovers += v
	}
	t.Logf("claims taken over from killed replicas, by the replicas alive at the end: %.0f", takeovers)
	rate := 100 * float64(dups) / float64(len(ids))
	t.Logf("kills %d, accepted %d, send errors %d, duplicates %d (%.2f%% of accepted)", kills, len(ids), sendErrors, dups, rate)
	// A duplicate is a delivery in flight when its replica was killed, so
	// on a loaded machine, where few messages go through, up to one per
	// kill is not yet a rate.
	if rate >= 1 && dups > kills {
		t.Errorf("duplicates are %.2f%% of accepted messages and more than one per kill, want under 1%%", rate)
	}
}

// TestClusterQueueImport (acceptance 6): `smarthost queue import` moves
// the queue file of a stopped relay, 1,000 messages of which some are
// partly delivered and some held, into the shared queue. A replica then
// delivers what was pending, to the recipients still pending only, keeps
// the held ones held, and a second and a third import (before and after
// those deliveries) copy nothing.
func TestClusterQueueImport(t *testing.T) {
	t.Parallel()
	const total = 1000
	pki := testpki.New(t)
	first := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword,
		RcptReply: func(to string) *smtp.SMTPError {
			if strings.HasPrefix(to, "later-") {
				return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 1}, Message: "Mailbox busy"}
			}
			return nil
		}})
	fileDir := t.TempDir()
	r := startRelay(t, writeConfig(t, relayConfig{Dir: fileDir, PKI: pki, UpstreamAddr: first.Addr(), RetryMin: "1h", RetryMax: "2h"}))
	s := connect(t, r.addr, pki)
	ids := make([]string, total)
	partly := 0
	for i := range total {
		rcpts := []string{fmt.Sprintf("later-%d@example.net", i)}
		if i%3 == 0 {
			rcpts = append([]string{fmt.Sprintf("ok-%d@example.net", i)}, rcpts...)
			partly++
		}
		id, err := s.send("app@example.com", rcpts, fmt.Sprintf("Subject: import %d\r\n\r\nbody %d\r\n", i, i))
		if err != nil {
			t.Fatal(err)
		}
		ids[i] = id
	}
	s.close()
	testwait.For(t, 60*time.Second, "every message's first attempt", func() bool {
		if len(first.Messages()) < partly {
			return false
		}
		var list []queueEntry
		api(t, r, http.MethodGet, "/api/queue", &list)
		for _, e := range list {
			if e.Attempts == 0 || e.InFlight {
				return false
			}
		}
		return len(list) == total
	})
	held := map[string]bool{}
	for i := 0; i < total; i += 10 {
		api(t, r, http.MethodPost, "/api/queue/"+ids[i]+"/hold", nil)
		held[ids[i]] = true
	}
	r.stop()

	q := newSharedQueue(t, false)
	second := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	cfg := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: second.Addr(), QueueExtra: q.config("")})
	importQueue := func(wantCopied, wantPresent int) {
		t.Helper()
		cmd := exec.Command(binary, "queue", "import", "-from", filepath.Join(fileDir, "queue.db"), "-config", cfg)
		cmd.Env = append(os.Environ(), upPassEnv+"="+upPassword, adminEnv+"="+adminToken)
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("smarthost queue import: %v\n%s", err, out)
		}
		if !strings.Contains(string(out), fmt.Sprintf("copied %d messages from ", wantCopied)) {
			t.Errorf("import: want %d copied:\n%s", wantCopied, out)
		}
		if wantPresent > 0 && !strings.Contains(string(out), fmt.Sprintf("%d messages were copied before, not copied again", wantPresent)) {
			t.Errorf("import: want %d already there:\n%s", wantPresent, out)
		}
	}
	importQueue(total, 0)
	importQueue(0, total)

	pg := startRelay(t, cfg)
	var list []queueEntry
	api(t, pg, http.MethodGet, "/api/queue", &list)
	if len(list) != total {
		t.Fatalf("the shared queue lists %d messages after the import, want %d", len(list), total)
	}
	api(t, pg, http.MethodPost, "/api/queue/flush", nil)
	testwait.For(t, 90*time.Second, "the pending recipients delivered", func() bool { return len(second.Messages()) >= total-len(held) })
	time.Sleep(2 * time.Second) // nothing more comes
	got := map[string]int{}
	for _, m := range second.Messages() {
		for _, to := range m.To {
			got[to]++
		}
		if id := queueIDOf(m.Data); held[id] {
			t.Errorf("held message %s delivered", id)
		}
	}
	for i, id := range ids {
		later := fmt.Sprintf("later-%d@example.net", i)
		switch {
		case got[fmt.Sprintf("ok-%d@example.net", i)] != 0:
			t.Errorf("message %s: its recipient delivered before the import was delivered again", id)
		case held[id] && got[later] != 0:
			t.Errorf("held message %s delivered", id)
		case !held[id] && got[later] != 1:
			t.Errorf("message %s: %s delivered %d times, want once", id, later, got[later])
		}
	}
	list = nil
	api(t, pg, http.MethodGet, "/api/queue", &list)
	if len(list) != len(held) {
		t.Errorf("%d messages left in the queue, want the %d held", len(list), len(held))
	}
	for _, e := range list {
		if !held[e.ID] || !e.Held {
			t.Errorf("left in the queue: %+v", e)
		}
	}
	pg.stop()
	importQueue(0, total)
}
