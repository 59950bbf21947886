package queue_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"smarthost/internal/testpg"
	"smarthost/internal/testwait"
	"smarthost/queue"
)

// openPG opens a store on dsn, closed when t ends.
func openPG(t *testing.T, dsn string, opts queue.PostgresOptions) *queue.PGStore {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := queue.OpenPostgres(ctx, dsn, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func pgMessage(rcpt string) *queue.Message {
	return &queue.Message{From: "app@example.com", Recipients: []queue.Recipient{{Addr: rcpt}}}
}

// dueAgain is the Start of an attempt whose message is due again at
// once: only the claim's lease keeps another Claim from taking it.
func dueAgain() queue.Start {
	now := time.Now()
	return queue.Start{Now: now, Retry: func(int) time.Time { return now }}
}

// TestPGReplicasClaimConcurrently: two stores on one database, as two
// replicas, claim from many goroutines each: every message is claimed
// exactly once while the leases hold.
func TestPGReplicasClaimConcurrently(t *testing.T) {
	t.Parallel()
	dsn := testpg.Shared(t).NewDatabase(t)
	a, b := openPG(t, dsn, queue.PostgresOptions{}), openPG(t, dsn, queue.PostgresOptions{})
	const n = 300
	put := map[string]bool{}
	for i := range n {
		m := pgMessage("r@example.net")
		if err := []*queue.PGStore{a, b}[i%2].Put(context.Background(), m, []byte("x")); err != nil {
			t.Fatal(err)
		}
		put[m.ID] = true
	}
	var (
		mu      sync.Mutex
		claimed = map[string]int{}
		wg      sync.WaitGroup
	)
	for _, s := range []*queue.PGStore{a, b} {
		for range 8 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					// Due again at once: a second claim would find it due.
					c, err := s.Claim(context.Background(), dueAgain(), 4, nil)
					if err != nil {
						t.Errorf("Claim: %v", err)
						return
					}
					if len(c.Attempts) == 0 {
						return
					}
					mu.Lock()
					for _, at := range c.Attempts {
						claimed[at.Message.ID]++
					}
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	for id, k := range claimed {
		if k != 1 || !put[id] {
			t.Errorf("%s claimed %d times (put: %v)", id, k, put[id])
		}
	}
	if len(claimed) != n {
		t.Errorf("claimed %d messages, want %d", len(claimed), n)
	}
	for _, s := range []*queue.PGStore{a, b} {
		if st, err := s.Stats(); err != nil || st.InFlight != n || st.Queued != 0 {
			t.Errorf("Stats = %+v, %v; want all %d in flight", st, err, n)
		}
	}
}

// TestPGLeaseTakeover: a store that stops renewing its lease loses the
// message to another once the lease lapses, and its Finish records
// nothing.
func TestPGLeaseTakeover(t *testing.T) {
	dsn := testpg.Shared(t).NewDatabase(t)
	const lease = 2 * time.Second
	a := openPG(t, dsn, queue.PostgresOptions{Lease: lease, Owner: "a"})
	b := openPG(t, dsn, queue.PostgresOptions{Lease: lease, Owner: "b"})
	m := pgMessage("r@example.net")
	if err := a.Put(context.Background(), m, []byte("x")); err != nil {
		t.Fatal(err)
	}
	c, err := a.Claim(context.Background(), dueAgain(), 10, nil)
	if err != nil || len(c.Attempts) != 1 {
		t.Fatalf("Claim = %+v, %v", c, err)
	}
	claimedAt := time.Now()
	a.StopRenewing()

	var taken queue.Attempt
	for {
		c, err := b.Claim(context.Background(), dueAgain(), 10, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Attempts) == 1 {
			taken = c.Attempts[0]
			break
		}
		if time.Since(claimedAt) > 10*lease {
			t.Fatal("the lapsed lease was never taken over")
		}
		time.Sleep(100 * time.Millisecond)
	}
	if d := time.Since(claimedAt); d < lease {
		t.Errorf("taken over after %v, before the lease of %v lapsed", d, lease)
	}
	if taken.Message.ID != m.ID || taken.Message.Attempts != 2 {
		t.Errorf("took over %+v, want %s at its second attempt", taken.Message, m.ID)
	}
	if got := b.Takeovers(); got != 1 {
		t.Errorf("Takeovers = %d, want 1", got)
	}
	_, err = a.Finish(context.Background(), c.Attempts[0], nil, func(m *queue.Message) (bool, []queue.DSN) {
		m.Recipients[0].State = queue.Delivered
		return true, nil
	})
	if !errors.Is(err, queue.ErrClaimLost) {
		t.Errorf("Finish by the store that lost the lease: %v, want ErrClaimLost", err)
	}
	if e, err := b.Get(m.ID); err != nil || !e.InFlight || e.Attempts != 2 {
		t.Errorf("after the lost Finish: %+v, %v; want in flight at attempt 2", e, err)
	}
	if _, err := b.Finish(context.Background(), taken, nil, func(m *queue.Message) (bool, []queue.DSN) {
		m.Recipients[0].State = queue.Delivered
		return true, nil
	}); err != nil {
		t.Errorf("Finish by the store that took over: %v", err)
	}
}

// TestPGLeaseRenewed: while its owner lives, a claim outlasts its lease
// many times over and no other store takes it; once finished, it is due
// for the others.
func TestPGLeaseRenewed(t *testing.T) {
	dsn := testpg.Shared(t).NewDatabase(t)
	const lease = 2 * time.Second
	a := openPG(t, dsn, queue.PostgresOptions{Lease: lease, Owner: "a"})
	b := openPG(t, dsn, queue.PostgresOptions{Lease: lease, Owner: "b"})
	m := pgMessage("r@example.net")
	if err := a.Put(context.Background(), m, []byte("x")); err != nil {
		t.Fatal(err)
	}
	c, err := a.Claim(context.Background(), dueAgain(), 10, nil)
	if err != nil || len(c.Attempts) != 1 {
		t.Fatalf("Claim = %+v, %v", c, err)
	}
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		c, err := b.Claim(context.Background(), dueAgain(), 10, nil)
		if err != nil {
			t.Fatal(err)
		}
		if len(c.Attempts) != 0 {
			t.Fatalf("claimed by another store while its owner renews the lease: %+v", c.Attempts[0].Message)
		}
	}
	if _, err := a.Finish(context.Background(), c.Attempts[0], nil, func(m *queue.Message) (bool, []queue.DSN) {
		m.NextAttempt = time.Now().Add(-time.Second)
		return false, nil
	}); err != nil {
		t.Fatalf("Finish after 5s of renewed lease: %v", err)
	}
	// The other store learns of it from the NOTIFY sent with the commit.
	testwait.For(t, 2*time.Second, "the other store to claim the finished message", func() bool {
		c, err := b.Claim(context.Background(), dueAgain(), 10, nil)
		if err != nil {
			t.Fatal(err)
		}
		return len(c.Attempts) == 1
	})
	if a.Takeovers()+b.Takeovers() != 0 {
		t.Errorf("takeovers %d, %d; want none", a.Takeovers(), b.Takeovers())
	}
}

// TestPGRecovered: a store opened after another's lease lapsed counts
// the attempt whose outcome is unknown.
func TestPGRecovered(t *testing.T) {
	dsn := testpg.Shared(t).NewDatabase(t)
	a := openPG(t, dsn, queue.PostgresOptions{Lease: time.Second})
	for range 2 {
		if err := a.Put(context.Background(), pgMessage("r@example.net"), []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	if c, err := a.Claim(context.Background(), dueAgain(), 1, nil); err != nil || len(c.Attempts) != 1 {
		t.Fatalf("Claim = %+v, %v", c, err)
	}
	a.Close() // without Finish: the lease lapses
	if b := openPG(t, dsn, queue.PostgresOptions{}); b.Recovered() != 0 {
		t.Errorf("Recovered = %d while the lease holds, want 0", b.Recovered())
	}
	time.Sleep(1500 * time.Millisecond)
	if b := openPG(t, dsn, queue.PostgresOptions{}); b.Recovered() != 1 {
		t.Errorf("Recovered = %d after the lease lapsed, want 1", b.Recovered())
	}
}

// takeAll is an Intake that takes every message.
type takeAll struct{ got chan queue.Attempt }

func (in takeAll) Reserve(string) (queue.Start, bool) { return dueAgain(), true }
func (in takeAll) Enqueue(a queue.Attempt)            { in.got <- a }
func (in takeAll) Cancel(string)                      {}

// waitWake reports whether w receives within d.
func waitWake(w <-chan struct{}, d time.Duration) bool {
	select {
	case <-w:
		return true
	case <-time.After(d):
		return false
	}
}

func drain(w <-chan struct{}) {
	select {
	case <-w:
	default:
	}
}

// TestPGWakeAcrossStores: a Put on one store wakes another store's
// scheduler at once, through LISTEN/NOTIFY, not by polling; a message
// that the putting store's intake took wakes nobody.
func TestPGWakeAcrossStores(t *testing.T) {
	t.Parallel()
	dsn := testpg.Shared(t).NewDatabase(t)
	a, b := openPG(t, dsn, queue.PostgresOptions{}), openPG(t, dsn, queue.PostgresOptions{})
	drain(b.Wake())
	start := time.Now()
	if err := a.Put(context.Background(), pgMessage("r@example.net"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	if !waitWake(b.Wake(), time.Second) {
		t.Fatal("a Put on one store did not wake the other within a second")
	}
	t.Logf("woken after %v", time.Since(start))

	in := takeAll{got: make(chan queue.Attempt, 1)}
	a.SetIntake(in)
	drain(b.Wake())
	if err := a.Put(context.Background(), pgMessage("s@example.net"), []byte("y")); err != nil {
		t.Fatal(err)
	}
	<-in.got
	if waitWake(b.Wake(), time.Second) {
		t.Error("a message claimed by the putting store's intake woke another store")
	}
}

// TestPGOutage: with its database stopped, Put fails and the store is
// not writable; once the database is back, the store turns writable by
// itself, Put works, and wake-ups reach it again.
func TestPGOutage(t *testing.T) {
	t.Parallel()
	srv := testpg.Start(t, testpg.Options{})
	dsn := srv.NewDatabase(t)
	a, b := openPG(t, dsn, queue.PostgresOptions{}), openPG(t, dsn, queue.PostgresOptions{})
	if err := a.Put(context.Background(), pgMessage("r@example.net"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := srv.Stop(); err != nil {
		t.Fatal(err)
	}
	drain(b.Wake())
	m := pgMessage("s@example.net")
	if err := a.Put(context.Background(), m, []byte("y")); !errors.Is(err, queue.ErrUnavailable) {
		t.Fatalf("Put with the database stopped: %v, want an error wrapping ErrUnavailable", err)
	}
	if a.Writable() {
		t.Error("Writable after a failed Put")
	}
	if _, err := a.Claim(context.Background(), dueAgain(), 10, nil); err == nil {
		t.Error("Claim succeeded with the database stopped")
	}
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !a.Writable(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("not writable 10s after the database came back")
		}
	}
	// The listener wakes its scheduler once it is back: what was notified
	// meanwhile is lost.
	if !waitWake(b.Wake(), 10*time.Second) {
		t.Fatal("no wake-up when the listener reconnected")
	}
	drain(b.Wake())
	m = pgMessage("t@example.net")
	if err := a.Put(context.Background(), m, []byte("z")); err != nil {
		t.Fatalf("Put after the database came back: %v", err)
	}
	if !waitWake(b.Wake(), time.Second) {
		t.Error("a Put did not wake the other store after the outage")
	}
	if n, err := b.Len(); err != nil || n != 2 {
		t.Errorf("Len = %d, %v; want 2: the one before the outage and the one after", n, err)
	}
}

// TestPGSpooledLarge: a spooled message of several MiB goes into the
// database in chunks and reads back byte for byte, from every reader.
func TestPGSpooledLarge(t *testing.T) {
	t.Parallel()
	dsn := testpg.Shared(t).NewDatabase(t)
	s := openPG(t, dsn, queue.PostgresOptions{SpoolDir: t.TempDir()})
	head := []byte("Subject: large\r\n\r\n")
	rest := make([]byte, 6<<20+12345)
	rand.Read(rest)
	sp, err := s.NewSpool()
	if err != nil {
		t.Fatal(err)
	}
	for r := rest; len(r) > 0; {
		n := min(len(r), 100000)
		if _, err := sp.Write(r[:n]); err != nil {
			t.Fatal(err)
		}
		r = r[n:]
	}
	m := pgMessage("r@example.net")
	if err := s.PutSpooled(context.Background(), m, head, sp); err != nil {
		t.Fatal(err)
	}
	if m.Size != int64(len(head)+len(rest)) {
		t.Errorf("Size %d, want %d", m.Size, len(head)+len(rest))
	}

	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var chunks, biggest int
	if err := conn.QueryRow(ctx, `SELECT count(*), max(octet_length(data)) FROM queue_bodies WHERE id = $1 AND seq > 0`, m.ID).Scan(&chunks, &biggest); err != nil {
		t.Fatal(err)
	}
	if want := (len(rest) + 256<<10 - 1) / (256 << 10); chunks != want || biggest != 256<<10 {
		t.Errorf("stored in %d chunks of at most %d bytes, want %d of 256 KiB", chunks, biggest, want)
	}

	c, err := s.Claim(ctx, dueAgain(), 1, nil)
	if err != nil || len(c.Attempts) != 1 {
		t.Fatalf("Claim = %+v, %v", c, err)
	}
	body, closeBody, err := s.OpenBody(c.Attempts[0])
	if err != nil {
		t.Fatal(err)
	}
	want := append(bytes.Clone(head), rest...)
	if body.Size() != int64(len(want)) || !bytes.Equal(body.Head(), head) {
		t.Errorf("Body: Size %d, head %q; want %d, %q", body.Size(), body.Head(), len(want), head)
	}
	for range 2 {
		got, err := io.ReadAll(body.Reader())
		if err != nil || !bytes.Equal(got, want) {
			t.Errorf("read %d bytes, %v; want the %d bytes put", len(got), err, len(want))
		}
	}
	closeBody()

	// Deleted during its attempt: the content is gone for good.
	if err := s.Delete(m.ID); err != nil {
		t.Fatal(err)
	}
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM queue_bodies WHERE id = $1`, m.ID).Scan(&chunks); err != nil || chunks != 0 {
		t.Errorf("%d chunks left after Delete, %v", chunks, err)
	}
	if b, _, err := s.OpenBody(c.Attempts[0]); !errors.Is(err, fs.ErrNotExist) || !bytes.Equal(b.Head(), head) || b.Size() != int64(len(head)) {
		t.Errorf("OpenBody of a deleted message: %v, Size %d; want fs.ErrNotExist and the head alone", err, b.Size())
	}
}

// TestPGSchedulersShareQueue: two schedulers, each on a store of its own
// on one database, as two replicas, deliver everything put on either:
// each message once, never by both at once, deferred ones retried by
// whichever replica claims them.
func TestPGSchedulersShareQueue(t *testing.T) {
	t.Parallel()
	dsn := testpg.Shared(t).NewDatabase(t)
	const n = 120
	var (
		mu        sync.Mutex
		running   = map[string]bool{}
		tries     = map[string]int{}
		delivered = map[string]int{}
	)
	deliver := func(_ context.Context, m queue.Message, body queue.Body) []queue.Result {
		mu.Lock()
		if running[m.ID] {
			t.Errorf("%s delivered by two replicas at once", m.ID)
		}
		running[m.ID] = true
		tries[m.ID]++
		first := tries[m.ID] == 1
		mu.Unlock()
		data, err := io.ReadAll(body.Reader())
		if err != nil || string(data) != "body of "+m.Recipients[0].Addr {
			t.Errorf("%s: body %q, %v", m.ID, data, err)
		}
		time.Sleep(5 * time.Millisecond)
		state := queue.Delivered
		if first && m.Recipients[0].Addr[0] == 'd' {
			state = queue.Pending // deferred once
		}
		mu.Lock()
		running[m.ID] = false
		if state == queue.Delivered {
			delivered[m.ID]++
		}
		mu.Unlock()
		return []queue.Result{{Rcpt: m.Recipients[0].Addr, State: state, Reply: "test", Upstream: "test"}}
	}
	var stores []*queue.PGStore
	for range 2 {
		st := openPG(t, dsn, queue.PostgresOptions{})
		s := queue.NewScheduler(st, deliver)
		s.Workers = 4
		s.RetryMin, s.RetryMax = 20*time.Millisecond, 40*time.Millisecond
		s.Logger = slog.New(slog.DiscardHandler)
		errc := make(chan error, 1)
		go func() { errc <- s.Run() }()
		t.Cleanup(func() {
			s.Close()
			<-errc
		})
		stores = append(stores, st)
	}
	for i := range n {
		rcpt := []string{"a", "d"}[i%2] + string(rune('a'+i%26)) + "@example.net"
		m := pgMessage(rcpt)
		if err := stores[i%2].Put(context.Background(), m, []byte("body of "+rcpt)); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		left, err := stores[0].Len()
		if err != nil {
			t.Fatal(err)
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d messages left after 30s", left)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(delivered) != n {
		t.Errorf("%d messages delivered, want %d", len(delivered), n)
	}
	for id, k := range delivered {
		if k != 1 {
			t.Errorf("%s delivered %d times", id, k)
		}
	}
}

// TestPGImportOnce: a message imported once is refused by a second
// import, also after it has left the queue, so that importing the same
// file twice sends nothing twice; a message that was Put is not
// recorded as imported.
func TestPGImportOnce(t *testing.T) {
	t.Parallel()
	s := openPG(t, testpg.Shared(t).NewDatabase(t), queue.PostgresOptions{})
	ctx := context.Background()
	m := pgMessage("r@example.net")
	m.ID = "0123456789abcdef"
	m.Received = time.Now().Add(-time.Hour)
	m.NextAttempt = time.Now()
	if err := s.Import(ctx, *m, []byte("Subject: x\r\n\r\nbody\r\n"), nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Import(ctx, *m, []byte("Subject: x\r\n\r\nbody\r\n"), nil); !errors.Is(err, queue.ErrExists) {
		t.Fatalf("second import while queued: %v, want ErrExists", err)
	}
	if err := s.Delete(m.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.Import(ctx, *m, []byte("Subject: x\r\n\r\nbody\r\n"), strings.NewReader("more")); !errors.Is(err, queue.ErrExists) {
		t.Fatalf("import after the message left the queue: %v, want ErrExists", err)
	}
	if n, err := s.Len(); err != nil || n != 0 {
		t.Fatalf("Len = %d, %v; want 0", n, err)
	}

	put := pgMessage("r@example.net")
	if err := s.Put(ctx, put, []byte("x")); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(put.ID); err != nil {
		t.Fatal(err)
	}
	if err := s.Import(ctx, *put, []byte("x"), nil); err != nil {
		t.Fatalf("import of an ID that was Put, not imported: %v", err)
	}
}

// TestPGLapsedAttemptStops: when a store cannot renew its leases (here
// it stops trying, as when the database is unreachable from it alone),
// the Scheduler's delivery is cancelled while the lease still holds, so
// that it has stopped before another replica could take the message over.
func TestPGLapsedAttemptStops(t *testing.T) {
	dsn := testpg.Shared(t).NewDatabase(t)
	const lease = 3 * time.Second
	a := openPG(t, dsn, queue.PostgresOptions{Lease: lease, Owner: "a"})

	type stop struct {
		at   time.Time
		held bool // the lease was still a's, and not lapsed, in the database
		err  error
	}
	started := make(chan struct{})
	stopped := make(chan stop, 1)
	deliver := func(ctx context.Context, m queue.Message, _ queue.Body) []queue.Result {
		close(started)
		<-ctx.Done()
		st := stop{at: time.Now()}
		qctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn, err := pgx.Connect(qctx, dsn)
		if err == nil {
			err = conn.QueryRow(qctx, `SELECT coalesce(lease_owner = 'a' AND lease_until > now(), false) FROM queue_messages WHERE id = $1`, m.ID).Scan(&st.held)
			conn.Close(qctx)
		}
		st.err = err
		stopped <- st
		return []queue.Result{{Rcpt: m.Recipients[0].Addr, State: queue.Pending, Reply: "stopped", Upstream: "test"}}
	}
	s := queue.NewScheduler(a, deliver)
	s.Logger = slog.New(slog.DiscardHandler)
	errc := make(chan error, 1)
	go func() { errc <- s.Run() }()
	t.Cleanup(func() {
		s.Close()
		<-errc
	})
	if err := a.Put(context.Background(), pgMessage("r@example.net"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("the delivery did not start")
	}
	begun := time.Now()
	a.StopRenewing()
	select {
	case st := <-stopped:
		t.Logf("renewals stopped; the delivery stopped %s later", st.at.Sub(begun).Round(time.Millisecond))
		if st.err != nil {
			t.Fatal(st.err)
		}
		if !st.held {
			t.Error("the delivery stopped only after its lease had lapsed: another replica could have taken the message over meanwhile")
		}
	case <-time.After(2 * lease):
		t.Fatal("the delivery went on after its lease could no longer be renewed")
	}
}

// TestPGOrphanWakesIdleStore: a replica that dies during an attempt
// NOTIFYs nobody; another, idle, is woken once the lease has lapsed, by
// its own look for due messages that no lease holds, and takes it over.
func TestPGOrphanWakesIdleStore(t *testing.T) {
	dsn := testpg.Shared(t).NewDatabase(t)
	const lease = 2 * time.Second
	a := openPG(t, dsn, queue.PostgresOptions{Lease: lease, Owner: "a"})
	b := openPG(t, dsn, queue.PostgresOptions{Lease: lease, Owner: "b"})
	if err := a.Put(context.Background(), pgMessage("r@example.net"), []byte("x")); err != nil {
		t.Fatal(err)
	}
	if c, err := a.Claim(context.Background(), dueAgain(), 1, nil); err != nil || len(c.Attempts) != 1 {
		t.Fatalf("Claim = %+v, %v", c, err)
	}
	a.Close() // dies: the lease is neither renewed nor ended
	time.Sleep(200 * time.Millisecond)
	for len(b.Wake()) > 0 {
		<-b.Wake() // the Put's NOTIFY
	}
	begun := time.Now()
	select {
	case <-b.Wake():
		t.Logf("woken %s after the owner died", time.Since(begun).Round(time.Millisecond))
	case <-time.After(3 * lease):
		t.Fatal("an idle store was not woken for a message whose owner died")
	}
	testwait.For(t, lease, "the takeover", func() bool {
		c, err := b.Claim(context.Background(), dueAgain(), 1, nil)
		if err != nil {
			t.Fatal(err)
		}
		return len(c.Attempts) == 1
	})
	if b.Takeovers() != 1 {
		t.Errorf("takeovers %d, want 1", b.Takeovers())
	}
}
