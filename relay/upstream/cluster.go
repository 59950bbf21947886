package upstream

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"smarthost/internal/pgmigrate"
)

// Cluster keeps the health and the rate-limit windows of upstreams in a
// PostgreSQL database that several relays share, so that they hold for
// all of them: an upstream that one relay found down is left out by all,
// and the messages of all count against a provider's quota, to the
// message. Each call is one short transaction on the upstream's row,
// taken under its row lock, deciding as the in-memory ones do.
//
// Set a Deliverer's NewHealth and NewRateWindow to the Cluster's Health
// and RateWindow. Times are the callers' (the Deliverer's Now), kept to
// the microsecond; the leases on slots and probes run on the database's
// clock, so that replicas whose clocks differ agree on them.
//
// Most deliveries find their upstream up and leave it so; to spare the
// database a read of its row for each of them, a relay that read or
// wrote an upstream's row and found it up without failures trusts that,
// for Admit and for Report of a success, during HealthCache
// (ClusterOptions). An upstream that another relay marks down is thus
// left out by this one within HealthCache, and a database that stops
// answering is noticed within it. Failures, probes, upstreams down or
// with failures, ProbeNow and Status always go to the database.
type Cluster struct {
	pool        *pgxpool.Pool
	owner       string
	lease       time.Duration
	poll        time.Duration
	healthCache time.Duration // < 0: none
	logger      *slog.Logger

	hmu    sync.Mutex
	health map[string]*healthCache // by upstream name

	mu     sync.Mutex
	slots  map[int64]struct{}  // in-flight rate slots held, renewed
	probes map[string]struct{} // upstreams being probed, renewed
	// unreleased are the releases that the database did not take, tried
	// again with each renewal.
	unreleased []release
	stop       chan struct{}
	done       chan struct{}
	closed     bool
}

// ClusterOptions tune a Cluster; zero fields take the defaults.
type ClusterOptions struct {
	// Lease is how long an in-flight rate slot or a probe of a relay that
	// stopped renewing it (it died) goes on counting; default 2m. The
	// relay that holds them renews them every Lease/3.
	Lease time.Duration
	// Poll is how often a delivery waiting for a rate slot asks again,
	// since slots that other relays release are not signalled; default 1s.
	Poll time.Duration
	// HealthCache is how long a relay admits deliveries to an upstream
	// that it last saw up without failures, and takes their successes,
	// without asking the database; so it is also how long it may go on
	// sending to an upstream that another relay has marked down since.
	// Default 1s; negative asks the database every time.
	HealthCache time.Duration
	// Logger gets the database's errors in full; the errors returned say
	// only that the database could not answer. Default slog's.
	Logger *slog.Logger
}

// clusterSchema is component "upstream" of pgmigrate: the upstreams'
// shared state.
var clusterSchema = []string{
	`CREATE TABLE upstream_health (
		name          text PRIMARY KEY,
		down          boolean NOT NULL DEFAULT false,
		down_until    timestamptz,
		since         timestamptz,
		failures      integer NOT NULL DEFAULT 0,
		last_error    text NOT NULL DEFAULT '',
		downs         integer NOT NULL DEFAULT 0,
		probe_owner   text,
		probe_expires timestamptz
	);
	CREATE TABLE upstream_rate (
		name  text PRIMARY KEY,
		ended timestamptz[] NOT NULL DEFAULT '{}'
	);
	CREATE TABLE upstream_rate_slot (
		id      bigserial PRIMARY KEY,
		name    text NOT NULL,
		owner   text NOT NULL,
		expires timestamptz NOT NULL
	);
	CREATE INDEX upstream_rate_slot_name ON upstream_rate_slot (name, expires);`,
}

// NewCluster creates or migrates the tables of the upstreams' shared
// state in pool's database and returns the Cluster of this relay. owner
// names this relay among those that share the database (a pod name and
// a process ID, say): it must be unique, since the slots and probes it
// takes are its own. Close stops renewing them; the pool stays the
// caller's.
func NewCluster(ctx context.Context, pool *pgxpool.Pool, owner string, opts ClusterOptions) (*Cluster, error) {
	if owner == "" {
		return nil, errors.New("cluster: empty owner")
	}
	if err := pgmigrate.Apply(ctx, pool, "upstream", clusterSchema); err != nil {
		return nil, err
	}
	c := &Cluster{
		pool:        pool,
		owner:       owner,
		lease:       opts.Lease,
		poll:        opts.Poll,
		healthCache: opts.HealthCache,
		logger:      opts.Logger,
		health:      make(map[string]*healthCache),
		slots:       make(map[int64]struct{}),
		probes:      make(map[string]struct{}),
		stop:        make(chan struct{}),
		done:        make(chan struct{}),
	}
	if c.lease <= 0 {
		c.lease = 2 * time.Minute
	}
	if c.poll <= 0 {
		c.poll = time.Second
	}
	if c.healthCache == 0 {
		c.healthCache = time.Second
	}
	if c.logger == nil {
		c.logger = slog.Default()
	}
	go c.renew()
	return c, nil
}

// Close stops renewing the slots and probes this relay holds; those it
// has not given back lapse after the lease.
func (c *Cluster) Close() {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return
	}
	c.closed = true
	c.mu.Unlock()
	close(c.stop)
	<-c.done
}

const (
	renewSlotsSQL = `UPDATE upstream_rate_slot SET expires = now() + $2::float8 * interval '1 microsecond'
		WHERE id = ANY($1)`
	renewProbesSQL = `UPDATE upstream_health SET probe_expires = now() + $3::float8 * interval '1 microsecond'
		WHERE name = ANY($1) AND probe_owner = $2`
)

// renew keeps the leases of the slots and probes held alive while this
// relay lives, however long their transactions take, and gives back the
// slots whose release failed.
func (c *Cluster) renew() {
	defer close(c.done)
	t := time.NewTicker(c.lease / 3)
	defer t.Stop()
	for {
		select {
		case <-c.stop:
			return
		case <-t.C:
		}
		c.mu.Lock()
		retry := c.unreleased
		c.unreleased = nil
		c.mu.Unlock()
		for i, rel := range retry {
			ctx, cancel := context.WithTimeout(context.Background(), c.lease/3)
			err := c.release(ctx, rel)
			cancel()
			if err != nil {
				c.mu.Lock()
				c.unreleased = append(c.unreleased, retry[i:]...)
				c.mu.Unlock()
				break
			}
		}
		c.mu.Lock()
		var ids []int64
		for id := range c.slots {
			ids = append(ids, id)
		}
		var names []string
		for name := range c.probes {
			names = append(names, name)
		}
		c.mu.Unlock()
		ctx, cancel := context.WithTimeout(context.Background(), c.lease/3)
		if len(ids) > 0 {
			if _, err := c.pool.Exec(ctx, renewSlotsSQL, ids, float64(c.lease.Microseconds())); err != nil {
				c.logger.Warn("rate limit slots not renewed", "err", err)
			}
		}
		if len(names) > 0 {
			if _, err := c.pool.Exec(ctx, renewProbesSQL, names, c.owner, float64(c.lease.Microseconds())); err != nil {
				c.logger.Warn("upstream probes not renewed", "err", err)
			}
		}
		cancel()
	}
}

// errSharedState is what the Cluster's methods return when the database
// cannot answer. The Deliverer puts it in results, which may reach a
// sender's DSN, so it names no host, socket or user; the Logger gets the
// cause.
var errSharedState = errors.New("shared upstream state unavailable")

func (c *Cluster) fail(what, name string, err error) error {
	c.logger.Warn("shared upstream state: "+what, "upstream", name, "err", err)
	return errSharedState
}

// inTx runs f in one transaction and commits it.
func (c *Cluster) inTx(ctx context.Context, f func(tx pgx.Tx) error) error {
	tx, err := c.pool.Begin(ctx)
	for i := 0; i < maxRetries && retryable(ctx, err); i++ {
		tx, err = c.pool.Begin(ctx)
	}
	if err != nil {
		return err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if err := f(tx); err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// retryable tells whether err is a connection that broke before the
// statement reached the server, as the pool's idle connections do when
// the database restarts: asking again on another one is safe, up to
// maxRetries times.
const maxRetries = 3

func retryable(ctx context.Context, err error) bool {
	return err != nil && ctx.Err() == nil && pgconn.SafeToRetry(err)
}

// microTime is t to the microsecond that PostgreSQL keeps, rounded up: a
// logged end time must not move earlier, or a window would hold one more.
func microTime(t time.Time) time.Time {
	u := t.Truncate(time.Microsecond)
	if u.Before(t) {
		u = u.Add(time.Microsecond)
	}
	return u
}

// Health returns the shared Health of the upstream called name.
func (c *Cluster) Health(name string) Health { return &clusterHealth{c: c, name: name} }

type clusterHealth struct {
	c    *Cluster
	name string
}

// healthRow is an upstream_health row: the state machine's state and
// who holds the probe, if anyone.
type healthRow struct {
	s          healthState
	probeOwner string
}

const (
	// The columns of healthRow; probing only while the probe's lease holds.
	healthColumns = `down, down_until, since, failures, last_error, downs, coalesce(probe_owner, ''),
		probe_owner IS NOT NULL AND probe_expires > now()`
	readHealthSQL = `SELECT ` + healthColumns + ` FROM upstream_health WHERE name = $1`
	// Creates the row if need be and locks it, in one statement.
	lockHealthSQL = `INSERT INTO upstream_health (name) VALUES ($1)
		ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
		RETURNING ` + healthColumns
	// $8: 0 keeps the probe as it is, 1 makes this relay the probe, 2 ends it.
	storeHealthSQL = `UPDATE upstream_health SET down = $2, down_until = $3, since = $4,
		failures = $5, last_error = $6, downs = $7,
		probe_owner = CASE $8::int WHEN 1 THEN $9::text WHEN 2 THEN NULL ELSE probe_owner END,
		probe_expires = CASE $8::int WHEN 1 THEN now() + $10::float8 * interval '1 microsecond'
			WHEN 2 THEN NULL ELSE probe_expires END
		WHERE name = $1`
)

func scanHealth(row pgx.Row) (healthRow, error) {
	var (
		h                healthRow
		downUntil, since *time.Time
	)
	err := row.Scan(&h.s.st.Down, &downUntil, &since, &h.s.st.Failures, &h.s.st.LastError, &h.s.downs, &h.probeOwner, &h.s.probing)
	if downUntil != nil {
		h.s.st.DownUntil = *downUntil
	}
	if since != nil {
		h.s.st.Since = *since
	}
	return h, err
}

func nullTime(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = microTime(t)
	return &t
}

// healthCache is what this relay last learnt of an upstream's row.
type healthCache struct {
	r  healthRow
	at time.Time // when the statement that learnt it began (monotonic)
	ok bool      // r is up without failures: worth trusting for a while

	// The changes of the row by this relay in flight, and a count of
	// their starts and ends: a read or change that overlapped another
	// change may have learnt an older state than the last one, so it
	// keeps nothing.
	changing int
	gen      uint64
}

// healthTicket is what a read or a change of the row remembers of the
// cache when it begins.
type healthTicket struct {
	at    time.Time
	gen   uint64
	valid bool
}

func (c *Cluster) healthEntry(name string) *healthCache {
	e := c.health[name]
	if e == nil {
		e = &healthCache{}
		c.health[name] = e
	}
	return e
}

// cachedHealth returns the upstream's state if this relay learnt less than
// healthCache ago that it was up without failures.
func (c *Cluster) cachedHealth(name string) (HealthStatus, bool) {
	if c.healthCache < 0 {
		return HealthStatus{}, false
	}
	c.hmu.Lock()
	defer c.hmu.Unlock()
	e := c.health[name]
	if e == nil || !e.ok || time.Since(e.at) >= c.healthCache {
		return HealthStatus{}, false
	}
	return e.r.s.st, true
}

// keep stores r, learnt by the statement that began at at, unless the
// cache holds what a later one learnt. Called with hmu held.
func (e *healthCache) keep(at time.Time, r healthRow) {
	if at.Before(e.at) {
		return
	}
	e.r, e.at = r, at
	e.ok = !r.s.st.Down && r.s.st.Failures == 0 && !r.s.probing
}

func (c *Cluster) beginHealthRead(name string) healthTicket {
	c.hmu.Lock()
	defer c.hmu.Unlock()
	e := c.healthEntry(name)
	return healthTicket{at: time.Now(), gen: e.gen, valid: e.changing == 0}
}

func (c *Cluster) endHealthRead(name string, t healthTicket, r healthRow) {
	c.hmu.Lock()
	defer c.hmu.Unlock()
	if e := c.healthEntry(name); t.valid && e.changing == 0 && e.gen == t.gen {
		e.keep(t.at, r)
	}
}

// beginHealthChange stops trusting the cache until the change is done:
// it may be a failure.
func (c *Cluster) beginHealthChange(name string) healthTicket {
	c.hmu.Lock()
	defer c.hmu.Unlock()
	e := c.healthEntry(name)
	e.changing++
	e.gen++
	e.ok = false
	return healthTicket{at: time.Now(), gen: e.gen, valid: true}
}

func (c *Cluster) endHealthChange(name string, t healthTicket, r healthRow, err error) {
	c.hmu.Lock()
	defer c.hmu.Unlock()
	e := c.healthEntry(name)
	e.changing--
	if err == nil && e.changing == 0 && e.gen == t.gen {
		e.keep(t.at, r)
	} else {
		e.ok = false
	}
	e.gen++
}

// read returns the upstream's state without locking it; a missing row is
// an upstream that has never failed.
func (h *clusterHealth) read(ctx context.Context) (healthRow, error) {
	t := h.c.beginHealthRead(h.name)
	r, err := scanHealth(h.c.pool.QueryRow(ctx, readHealthSQL, h.name))
	for i := 0; i < maxRetries && retryable(ctx, err); i++ {
		r, err = scanHealth(h.c.pool.QueryRow(ctx, readHealthSQL, h.name))
	}
	if errors.Is(err, pgx.ErrNoRows) {
		r, err = healthRow{}, nil
	}
	if err == nil {
		h.c.endHealthRead(h.name, t, r)
	}
	return r, err
}

// change applies f to the upstream's state under its row lock and stores
// the result; probe is what becomes of the probe, as storeHealthSQL's $8.
func (h *clusterHealth) change(ctx context.Context, f func(r *healthRow) (probe int)) (before, after healthRow, err error) {
	t := h.c.beginHealthChange(h.name)
	defer func() { h.c.endHealthChange(h.name, t, after, err) }()
	err = h.c.inTx(ctx, func(tx pgx.Tx) error {
		r, err := scanHealth(tx.QueryRow(ctx, lockHealthSQL, h.name))
		if err != nil {
			return err
		}
		before = r
		probe := f(&r)
		after = r
		st := &r.s.st
		_, err = tx.Exec(ctx, storeHealthSQL, h.name, st.Down, nullTime(st.DownUntil), nullTime(st.Since),
			st.Failures, st.LastError, r.s.downs, probe, h.c.owner, float64(h.c.lease.Microseconds()))
		return err
	})
	return before, after, err
}

func (h *clusterHealth) Admit(ctx context.Context, now time.Time) (bool, HealthStatus, error) {
	now = microTime(now)
	if st, ok := h.c.cachedHealth(h.name); ok {
		return false, st, nil
	}
	r, err := h.read(ctx)
	if err != nil {
		return false, HealthStatus{}, h.c.fail("health not read", h.name, err)
	}
	if cur := r.s; !cur.admit(now) {
		return false, r.s.st, nil // up, not due, or being probed: no lock needed
	}
	var probe bool
	_, after, err := h.change(ctx, func(r *healthRow) int {
		if probe = r.s.admit(now); probe {
			return 1
		}
		return 0
	})
	if err != nil {
		return false, HealthStatus{}, h.c.fail("probe not taken", h.name, err)
	}
	if probe {
		h.c.mu.Lock()
		h.c.probes[h.name] = struct{}{}
		h.c.mu.Unlock()
	}
	return probe, after.s.st, nil
}

func (h *clusterHealth) Report(ctx context.Context, now time.Time, rep HealthReport) (before, after HealthStatus, err error) {
	now = microTime(now)
	if !rep.Probe && (rep.Event == HealthNone || rep.Event == HealthOK) {
		// Most reports change nothing: a success while up and clean.
		if st, ok := h.c.cachedHealth(h.name); ok {
			return st, st, nil
		}
		r, err := h.read(ctx)
		if err != nil {
			return HealthStatus{}, HealthStatus{}, h.c.fail("health not read", h.name, err)
		}
		if rep.Event == HealthNone || (!r.s.st.Down && r.s.st.Failures == 0) {
			return r.s.st, r.s.st, nil
		}
	}
	if rep.Probe {
		h.c.mu.Lock()
		delete(h.c.probes, h.name)
		h.c.mu.Unlock()
	}
	b, a, err := h.change(ctx, func(r *healthRow) int {
		// A probe whose lease lapsed may have been taken over: the
		// newer probe stays.
		probing := r.s.probing
		r.s.report(now, rep)
		if rep.Probe && r.probeOwner == h.c.owner {
			return 2
		}
		r.s.probing = probing
		return 0
	})
	if err != nil {
		return HealthStatus{}, HealthStatus{}, h.c.fail("health not recorded", h.name, err)
	}
	return b.s.st, a.s.st, nil
}

func (h *clusterHealth) Status(ctx context.Context) (HealthStatus, error) {
	r, err := h.read(ctx)
	if err != nil {
		return HealthStatus{}, h.c.fail("health not read", h.name, err)
	}
	return r.s.st, nil
}

func (h *clusterHealth) ProbeNow(ctx context.Context, now time.Time) error {
	now = microTime(now)
	r, err := h.read(ctx)
	if err != nil {
		return h.c.fail("health not read", h.name, err)
	}
	if !r.s.st.Down || !now.Before(r.s.st.DownUntil) {
		return nil
	}
	_, _, err = h.change(ctx, func(r *healthRow) int {
		r.s.probeNow(now)
		return 0
	})
	if err != nil {
		return h.c.fail("probe not brought forward", h.name, err)
	}
	return nil
}

// RateWindow returns the shared rate-limit window of the upstream called
// name.
func (c *Cluster) RateWindow(name string) RateWindow { return &clusterWindow{c: c, name: name} }

type clusterWindow struct {
	c    *Cluster
	name string

	mu    sync.Mutex
	slots []int64 // in-flight slots taken through this window
	// changed is closed when this relay releases a slot, or after Poll,
	// so that a waiter asks again; other relays' releases are not
	// signalled.
	changed chan struct{}
}

const (
	// Creates the row if need be and locks it, in one statement.
	lockRateSQL = `INSERT INTO upstream_rate (name) VALUES ($1)
		ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
		RETURNING ended`
	// Drops the slots of relays that died and counts the live ones.
	inflightSQL = `WITH lapsed AS (
			DELETE FROM upstream_rate_slot WHERE name = $1 AND expires <= now()
		)
		SELECT count(*) FROM upstream_rate_slot WHERE name = $1 AND expires > now()`
	takeSlotSQL = `INSERT INTO upstream_rate_slot (name, owner, expires)
		VALUES ($1, $2, now() + $3::float8 * interval '1 microsecond') RETURNING id`
	storeEndedSQL = `UPDATE upstream_rate SET ended = $2 WHERE name = $1`
	freeSlotSQL   = `DELETE FROM upstream_rate_slot WHERE id = $1`
)

func (w *clusterWindow) Take(ctx context.Context, now time.Time, r Rate) (RateWait, error) {
	now = microTime(now)
	var (
		id          int64
		wait        time.Duration
		exact       bool
		ended, kept []time.Time
	)
	err := w.c.inTx(ctx, func(tx pgx.Tx) error {
		id = 0
		if err := tx.QueryRow(ctx, lockRateSQL, w.name).Scan(&ended); err != nil {
			return err
		}
		var inflight int
		if err := tx.QueryRow(ctx, inflightSQL, w.name).Scan(&inflight); err != nil {
			return err
		}
		log := loadRateLog(r, ended, inflight)
		if wait, exact = log.take(now); wait > 0 {
			return nil // commits the lapsed slots' removal
		}
		if err := tx.QueryRow(ctx, takeSlotSQL, w.name, w.c.owner, float64(w.c.lease.Microseconds())).Scan(&id); err != nil {
			return err
		}
		if kept = log.endTimes(); len(kept) != len(ended) {
			_, err := tx.Exec(ctx, storeEndedSQL, w.name, kept)
			return err
		}
		return nil
	})
	if err != nil {
		return RateWait{}, w.c.fail("rate limit slot not taken", w.name, err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if id != 0 {
		w.slots = append(w.slots, id)
		w.c.mu.Lock()
		w.c.slots[id] = struct{}{}
		w.c.mu.Unlock()
		return RateWait{Taken: true}, nil
	}
	if w.changed == nil {
		ch := make(chan struct{})
		w.changed = ch
		time.AfterFunc(w.c.poll, func() {
			w.mu.Lock()
			defer w.mu.Unlock()
			if w.changed == ch {
				close(ch)
				w.changed = nil
			}
		})
	}
	return RateWait{For: wait, Exact: exact, Changed: w.changed}, nil
}

func (w *clusterWindow) Release(ctx context.Context, now time.Time, r Rate, sent bool) error {
	rel := release{name: w.name, now: microTime(now), rate: r, sent: sent}
	w.mu.Lock()
	if n := len(w.slots); n > 0 {
		rel.id = w.slots[n-1]
		w.slots = w.slots[:n-1]
	}
	w.mu.Unlock()
	err := w.c.release(ctx, rel)
	w.mu.Lock()
	if w.changed != nil {
		close(w.changed)
		w.changed = nil
	}
	w.mu.Unlock()
	if err != nil {
		// The slot stays in flight, renewed, until the release lands:
		// a sent message must count against the quota.
		w.c.mu.Lock()
		w.c.unreleased = append(w.c.unreleased, rel)
		w.c.mu.Unlock()
		return w.c.fail("rate limit slot not given back yet", w.name, err)
	}
	return nil
}

// release is a RateWindow.Release of the slot id (0 if none was known).
type release struct {
	name string
	id   int64
	now  time.Time
	rate Rate
	sent bool
}

// release frees rel's slot, logging its end time if it was sent, and
// stops renewing it.
func (c *Cluster) release(ctx context.Context, rel release) error {
	var err error
	if rel.sent {
		err = c.inTx(ctx, func(tx pgx.Tx) error {
			var ended []time.Time
			if err := tx.QueryRow(ctx, lockRateSQL, rel.name).Scan(&ended); err != nil {
				return err
			}
			if _, err := tx.Exec(ctx, freeSlotSQL, rel.id); err != nil {
				return err
			}
			log := loadRateLog(rel.rate, ended, 1)
			log.release(rel.now, true)
			_, err := tx.Exec(ctx, storeEndedSQL, rel.name, log.endTimes())
			return err
		})
	} else if rel.id != 0 {
		_, err = c.pool.Exec(ctx, freeSlotSQL, rel.id)
		for i := 0; i < maxRetries && retryable(ctx, err); i++ {
			_, err = c.pool.Exec(ctx, freeSlotSQL, rel.id)
		}
	}
	if err == nil {
		c.mu.Lock()
		delete(c.slots, rel.id)
		c.mu.Unlock()
	}
	return err
}
