package queue

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"smarthost/internal/pgmigrate"
)

// pgChannel is the channel of the NOTIFY that every change making a
// message due sooner sends, so that an idle replica claims it at once.
const pgChannel = "smarthost_queue"

// pgOpTimeout bounds the operations that take no context (the admin
// API's, the metrics'), so that a database that stops answering does not
// hang them.
const pgOpTimeout = 30 * time.Second

// PostgresOptions tunes a PGStore. The zero value is usable.
type PostgresOptions struct {
	// Now is the clock for Received in Put and for "due now" in the
	// administrative operations. Leases go by the database's clock, the
	// one clock that every replica shares. Default time.Now.
	Now func() time.Time
	// Logger receives a line when commits start and stop failing and
	// when a lapsed lease is taken over. Default slog.Default().
	Logger *slog.Logger
	// Observer, if set, is told when messages leave the queue and when
	// DSNs are stored.
	Observer Observer
	// Lease is how long a claim holds without being renewed: the owner
	// renews it every Lease/3 while the attempt runs, and when the owner
	// dies another replica takes the message over once it has lapsed.
	// Default 30s.
	Lease time.Duration
	// Owner names this replica in the leases it takes; it must differ
	// between the replicas of one database. Default the host name, the
	// process ID and a random part.
	Owner string
	// MaxConns bounds the pool's connections, unless the connection
	// string sets pool_max_conns. Every submission being stored, every
	// claim and outcome, and every chunk read holds one while it runs.
	// Default 20.
	MaxConns int32
	// HistoryRetention is how long a message's history is kept after it
	// left the queue; zero keeps none (PruneHistory removes it).
	HistoryRetention time.Duration
	// Webhooks are the subscriptions whose posts are stored with the
	// events they ask for (DueWebhooks).
	Webhooks []Subscription
	// SpoolDir is where NewSpool writes the part of a large message past
	// its head until PutSpooled streams it into the database. Default
	// os.TempDir().
	SpoolDir string
}

// PGStore is the PostgreSQL Backend: one queue in a database that any
// number of replicas share. A claim is a lease, renewed while its attempt
// runs and taken over by another replica once it lapses. Its methods are
// safe for concurrent use.
type PGStore struct {
	pool      *pgxpool.Pool
	now       func() time.Time
	log       *slog.Logger
	observer  Observer
	lease     time.Duration
	owner     string
	spoolDir  string
	recovered int
	// historyRetention is PostgresOptions.HistoryRetention, subs
	// PostgresOptions.Webhooks.
	historyRetention time.Duration
	subs             []Subscription

	wake   chan struct{}
	intake intakeSlot

	// leased holds the tokens of the attempts this store handed out and
	// has not finished: the renewer extends their leases.
	leasedMu sync.Mutex
	leased   map[uint64]*pgLease

	// mustScan says that something changed since the last Claim's scan
	// (lastScan), which found the earliest message due at lastWake.
	mustScan atomic.Bool
	scanMu   sync.Mutex
	lastScan time.Time
	lastWake time.Time

	takeovers atomic.Uint64
	// failing is set by a commit that failed for want of the database and
	// cleared by one that succeeded; probing says the probe runs.
	failing atomic.Bool
	probing atomic.Bool

	ctx         context.Context // cancelled by Close: stops the goroutines
	cancel      context.CancelFunc
	wg          sync.WaitGroup
	stopRenewal context.CancelFunc
	// mu orders the start of the probe with Close, so that no goroutine
	// starts once Close waits for them.
	mu     sync.Mutex
	closed atomic.Bool
}

var _ Backend = (*PGStore)(nil)

// OpenPostgres connects to the database of dsn (a libpq connection string
// or URL), creates or migrates the queue's tables, and counts the
// messages whose lease lapsed with no outcome recorded (Recovered).
func OpenPostgres(ctx context.Context, dsn string, opts PostgresOptions) (*PGStore, error) {
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Lease <= 0 {
		opts.Lease = 30 * time.Second
	}
	if opts.Owner == "" {
		opts.Owner = defaultOwner()
	}
	if opts.SpoolDir == "" {
		opts.SpoolDir = os.TempDir()
	}
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("queue: postgres connection string: %w", err)
	}
	if !strings.Contains(dsn, "pool_max_conns") {
		cfg.MaxConns = cmp.Or(opts.MaxConns, 20)
	}
	if cfg.ConnConfig.ConnectTimeout == 0 {
		// An unreachable server fails a submission quickly (451) rather
		// than when the client gives up.
		cfg.ConnConfig.ConnectTimeout = 5 * time.Second
	}
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, fmt.Errorf("queue: postgres: %w", err)
	}
	if err := pgmigrate.Apply(ctx, pool, "queue", pgSteps); err != nil {
		pool.Close()
		return nil, fmt.Errorf("queue: postgres schema: %w", err)
	}
	s := &PGStore{
		pool: pool, now: opts.Now, log: opts.Logger, observer: opts.Observer,
		lease: opts.Lease, owner: opts.Owner, spoolDir: opts.SpoolDir, historyRetention: opts.HistoryRetention, subs: opts.Webhooks,
		wake: make(chan struct{}, 1), leased: map[uint64]*pgLease{},
	}
	err = pool.QueryRow(ctx, `SELECT count(*) FROM queue_messages
		WHERE lease_owner IS NOT NULL AND lease_until < now()`).Scan(&s.recovered)
	if err != nil {
		pool.Close()
		return nil, fmt.Errorf("queue: postgres: count lapsed leases: %w", err)
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	renewCtx, stopRenewal := context.WithCancel(s.ctx)
	s.stopRenewal = stopRenewal
	s.wg.Add(3)
	go s.renew(renewCtx)
	go s.watchLeases()
	listening := make(chan struct{})
	go s.listen(cfg.ConnConfig.Copy(), listening)
	// Wake-ups work once Open returns, unless the listener cannot connect
	// yet; it keeps trying meanwhile.
	select {
	case <-listening:
	case <-ctx.Done():
	case <-time.After(5 * time.Second):
	}
	return s, nil
}

// defaultOwner is the host name, the process ID and a random part, so
// that a restarted process never renews the leases of its predecessor.
func defaultOwner() string {
	host, _ := os.Hostname()
	var b [4]byte
	rand.Read(b[:])
	return fmt.Sprintf("%s/%d/%s", host, os.Getpid(), hex.EncodeToString(b[:]))
}

// Owner returns the name this store takes leases under.
func (s *PGStore) Owner() string { return s.owner }

// Takeovers returns how many claims this store took from a lease that had
// lapsed: attempts whose outcome is unknown, their owner having died or
// lost the database for longer than the lease.
func (s *PGStore) Takeovers() uint64 { return s.takeovers.Load() }

// Recovered implements Backend: the messages found, at open, with a
// lapsed lease.
func (s *PGStore) Recovered() int { return s.recovered }

// Writable implements Backend: false from a commit that failed for want
// of the database until one succeeds. Meanwhile the store probes the
// database every second, so that it turns true by itself.
func (s *PGStore) Writable() bool { return !s.failing.Load() }

// Pool returns the connection pool, for its statistics.
func (s *PGStore) Pool() *pgxpool.Pool { return s.pool }

// Close implements Backend: it stops renewing leases (they lapse, and
// another replica takes over what this one had not finished), waits for
// the operations in progress and closes the pool.
func (s *PGStore) Close() error {
	s.mu.Lock()
	already := s.closed.Swap(true)
	s.mu.Unlock()
	if already {
		return nil
	}
	s.cancel()
	s.wg.Wait()
	s.pool.Close() // waits for the connections in use
	return nil
}

// pgTime is t as the database stores it: no monotonic reading, whole
// microseconds. Records keep the same, so that a record and its columns
// agree exactly.
func pgTime(t time.Time) time.Time { return t.Round(0).Truncate(time.Microsecond) }

// pgTimes rounds m's times as pgTime does.
func pgTimes(m *Message) {
	m.Received, m.LastAttempt, m.NextAttempt = pgTime(m.Received), pgTime(m.LastAttempt), pgTime(m.NextAttempt)
}

// notify tells this store's scheduler that a message may be due now.
// Other replicas learn of it from the NOTIFY sent with the commit.
func (s *PGStore) notify() {
	s.rescan()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Wake implements Backend: it receives for this store's own changes and
// for the NOTIFY of every replica's.
func (s *PGStore) Wake() <-chan struct{} { return s.wake }

// SetIntake implements Backend.
func (s *PGStore) SetIntake(in Intake) { s.intake.set(in) }

// checkOpen refuses an operation on a closed store.
func (s *PGStore) checkOpen(op string) error {
	if s.closed.Load() {
		return fmt.Errorf("queue: %s: %w", op, ErrClosed)
	}
	return nil
}

// opContext is the context of an operation that takes none.
func opContext() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), pgOpTimeout)
}

// bound gives ctx the deadline of pgOpTimeout if it has none, so that a
// database that stops answering (a partition, with no reset) fails the
// operation instead of hanging it.
func bound(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, pgOpTimeout)
}

// pgError wraps err for op, and records whether the database failed: a
// failed connection, a server shutting down, a full disk, a read-only
// server (a standby after a failover) — not the caller's own error, such
// as a duplicate ID or its context ending. A database that cannot be
// reached at all makes it wrap ErrUnavailable.
func (s *PGStore) pgError(ctx context.Context, op string, err error) error {
	if err == nil {
		s.committed()
		return nil
	}
	if ctx.Err() == nil && dbFailure(err) {
		s.failed(err)
		if unreachable(err) {
			return fmt.Errorf("queue: %s: %w: %w", op, ErrUnavailable, err)
		}
	}
	return fmt.Errorf("queue: %s: %w", op, err)
}

// unreachable reports whether a failure of the database is that no
// writable server answers: no connection, a connection lost, a server
// shutting down or starting, a standby. A server that answers with an
// error of its own (a full disk) is reachable.
func unreachable(err error) bool {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch pe.Code {
		case "57P01", "57P02", "57P03", "25006": // shutdown, crash, starting, read-only
			return true
		}
		return pe.Code[:2] == "08" // connection exception
	}
	return true // no answer from the server at all
}

// dbFailure reports whether err says the database cannot commit, rather
// than that the change itself was refused.
func dbFailure(err error) bool {
	if errors.Is(err, ErrExists) || errors.Is(err, ErrNotFound) || errors.Is(err, ErrHeld) || errors.Is(err, ErrClaimLost) {
		return false
	}
	if re := (*readError)(nil); errors.As(err, &re) {
		return false // the spool file's, not the database's
	}
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		switch pe.Code[:2] {
		case "22", "23", "42", "P0": // data, integrity, syntax: the statement's own
			return false
		case "40": // a deadlock or serialization failure: this transaction's
			return false
		}
	}
	return true
}

// committed records a commit that worked.
func (s *PGStore) committed() {
	if s.failing.Swap(false) {
		s.log.Info("queue: the database accepts commits again")
	}
}

// failed records a commit that failed for want of the database, and
// starts the probe that finds out when it works again.
func (s *PGStore) failed(err error) {
	if !s.failing.Swap(true) {
		s.log.Error("queue: the database cannot commit; the relay is not ready until a commit succeeds", "err", err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() || s.probing.Swap(true) {
		return
	}
	s.wg.Add(1)
	go s.probe()
}

// probe asks the database for a transaction ID every probeEvery while
// commits fail: that needs a server that can write (a standby refuses),
// and writes nothing.
func (s *PGStore) probe() {
	defer s.wg.Done()
	defer s.probing.Store(false)
	t := time.NewTicker(probeEvery)
	defer t.Stop()
	for s.failing.Load() {
		select {
		case <-s.ctx.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(s.ctx, probeEvery)
		_, err := s.pool.Exec(ctx, "SELECT txid_current()")
		cancel()
		if err == nil {
			s.committed()
		}
	}
}

// renew extends the leases of this store's attempts every Lease/3, in
// one statement, and forgets those it no longer holds.
func (s *PGStore) renew(ctx context.Context) {
	defer s.wg.Done()
	t := time.NewTicker(s.lease / 3)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		s.leasedMu.Lock()
		tokens := make([]int64, 0, len(s.leased))
		for tok := range s.leased {
			tokens = append(tokens, int64(tok))
		}
		s.leasedMu.Unlock()
		if len(tokens) == 0 {
			continue
		}
		sent := time.Now() // the leases run from no earlier than this
		qctx, cancel := context.WithTimeout(ctx, s.lease/3)
		rows, err := s.pool.Query(qctx, `UPDATE queue_messages SET lease_until = now() + $1 * interval '1 microsecond'
			WHERE lease_owner = $2 AND token = ANY($3) RETURNING token`,
			s.lease.Microseconds(), s.owner, tokens)
		var held []int64
		if err == nil {
			held, err = pgx.CollectRows(rows, pgx.RowTo[int64])
		}
		cancel()
		if err != nil {
			s.log.Warn("queue: renewing leases failed", "err", err)
			continue
		}
		kept := make(map[int64]bool, len(held))
		for _, tok := range held {
			kept[tok] = true
		}
		s.leasedMu.Lock()
		for _, tok := range tokens {
			l := s.leased[uint64(tok)]
			switch {
			case l == nil:
			case kept[tok]:
				l.renewed = sent
			default:
				// Finished, deleted or taken over meanwhile: if the
				// attempt still runs, it is no longer the only one.
				s.lapse(uint64(tok), l)
			}
		}
		s.leasedMu.Unlock()
	}
}

// pgLease is an attempt this store handed out and has not finished.
type pgLease struct {
	renewed time.Time     // its lease runs at least until renewed + lease
	lapsed  chan struct{} // closed when the attempt must stop
}

// watchLeases stops the attempts whose leases were not renewed in time
// (the database unreachable from here, or too slow): once two thirds of
// a lease have passed since it was last extended, another replica may
// take the message over before the next renewal could, and two replicas
// must never deliver one message at once.
//
// Every half lease it also looks for a message that is due and that no
// replica holds: one whose lease lapsed when its replica died, or whose
// retry came due after that replica had stopped. Nothing NOTIFYs about
// those, and an idle scheduler would otherwise sleep past them.
func (s *PGStore) watchLeases() {
	defer s.wg.Done()
	t := time.NewTicker(s.lease / 10)
	defer t.Stop()
	orphans := time.NewTicker(s.lease / 2)
	defer orphans.Stop()
	for {
		select {
		case <-s.ctx.Done():
			return
		case <-orphans.C:
			if s.dueUnheld() {
				s.notify()
			}
			continue
		case <-t.C:
		}
		limit := time.Now().Add(-s.lease * 2 / 3)
		s.leasedMu.Lock()
		for tok, l := range s.leased {
			if l.renewed.Before(limit) {
				s.log.Warn("queue: the lease on an attempt could not be renewed in time; the attempt stops, so that no other replica delivers the message at the same time")
				s.lapse(tok, l)
			}
		}
		s.leasedMu.Unlock()
	}
}

// dueUnheld tells whether a message is due that no lease holds.
func (s *PGStore) dueUnheld() bool {
	ctx, cancel := context.WithTimeout(s.ctx, s.lease/3)
	defer cancel()
	var due bool
	err := s.pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM queue_messages
		WHERE NOT held AND next_attempt <= $1 AND (lease_owner IS NULL OR lease_until < now()))`, pgTime(s.now())).Scan(&due)
	return err == nil && due
}

// lapse stops the attempt of token; s.leasedMu must be held.
func (s *PGStore) lapse(token uint64, l *pgLease) {
	close(l.lapsed)
	delete(s.leased, token)
}

// hold adds an attempt to those the renewer extends, from claimed, when
// the statement that took its lease was sent, and returns the channel
// that Attempt.Lapsed gives; release takes it out.
func (s *PGStore) hold(token uint64, claimed time.Time) <-chan struct{} {
	l := &pgLease{renewed: claimed, lapsed: make(chan struct{})}
	s.leasedMu.Lock()
	s.leased[token] = l
	s.leasedMu.Unlock()
	return l.lapsed
}

func (s *PGStore) release(token uint64) {
	s.leasedMu.Lock()
	delete(s.leased, token)
	s.leasedMu.Unlock()
}

// listen keeps a connection of its own that LISTENs on pgChannel and
// turns each notification into a wake-up. When the connection breaks it
// reconnects every second, and wakes the scheduler once it is back: what
// was notified meanwhile was lost.
func (s *PGStore) listen(cfg *pgx.ConnConfig, listening chan<- struct{}) {
	defer s.wg.Done()
	first := true
	for {
		conn, err := pgx.ConnectConfig(s.ctx, cfg)
		if err == nil {
			if _, err = conn.Exec(s.ctx, "LISTEN "+pgChannel); err == nil {
				if first {
					close(listening)
				} else {
					s.log.Info("queue: listening for new messages again")
					s.notify()
				}
				first = false
				for err == nil {
					_, err = conn.WaitForNotification(s.ctx)
					if err == nil {
						s.notify()
					}
				}
			}
			conn.Close(context.Background())
		}
		if s.ctx.Err() != nil {
			return
		}
		if !first {
			s.log.Debug("queue: the connection that listens for new messages broke", "err", err)
		}
		select {
		case <-s.ctx.Done():
			return
		case <-time.After(time.Second):
		}
	}
}
