package relay

import (
	"bytes"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"golang.org/x/crypto/bcrypt"
)

// users is an immutable set of submitters, swapped whole on reload.
type users struct {
	byName map[string]*User
	// dummy is compared against when the user does not exist, so that a
	// login's timing does not tell which user names are valid: a hash of
	// the highest cost among the users (costs is every cost in use).
	dummy []byte
	costs []int
}

// newUsers indexes list; prev, if not nil, is the set it replaces, whose
// dummy hash is kept when the cost is the same.
func newUsers(list []User, prev *users) *users {
	u := &users{byName: make(map[string]*User, len(list))}
	cost := bcrypt.MinCost // with no users there is no name to tell apart
	for i := range list {
		usr := list[i]
		u.byName[usr.Name] = &usr
		if c, err := bcrypt.Cost(usr.PasswordHash); err == nil {
			if !slices.Contains(u.costs, c) {
				u.costs = append(u.costs, c)
			}
			if i == 0 || c > cost {
				cost = c
			}
		}
	}
	slices.Sort(u.costs)
	if prev != nil {
		if c, err := bcrypt.Cost(prev.dummy); err == nil && c == cost {
			u.dummy = prev.dummy
			return u
		}
	}
	u.dummy, _ = bcrypt.GenerateFromPassword([]byte("smarthost-no-such-user"), cost)
	return u
}

// current returns the user logged in as u, as the configuration now has
// it, or nil when it was removed or its password changed since.
func (us *users) current(u *User) *User {
	now := us.byName[u.Name]
	if now == nil || !bytes.Equal(now.PasswordHash, u.PasswordHash) {
		return nil
	}
	return now
}

// credentialCache remembers passwords that bcrypt already accepted, as
// HMACs under a per-process key, so that a client which logs in for every
// message does not pay bcrypt's cost each time. An entry is tied to the
// hash it was verified against, so a changed hash invalidates it.
type credentialCache struct {
	key []byte
	mu  sync.Mutex
	m   map[string]cachedCredential
}

type cachedCredential struct {
	hash string
	mac  []byte
}

func newCredentialCache() *credentialCache {
	key := make([]byte, 32)
	rand.Read(key)
	return &credentialCache{key: key, m: make(map[string]cachedCredential)}
}

func (c *credentialCache) mac(password string) []byte {
	h := hmac.New(sha256.New, c.key)
	h.Write([]byte(password))
	return h.Sum(nil)
}

// check verifies password against u's bcrypt hash.
func (c *credentialCache) check(u *User, password string) bool {
	mac := c.mac(password)
	c.mu.Lock()
	e, ok := c.m[u.Name]
	c.mu.Unlock()
	if ok && e.hash == string(u.PasswordHash) && hmac.Equal(e.mac, mac) {
		return true
	}
	if bcrypt.CompareHashAndPassword(u.PasswordHash, []byte(password)) != nil {
		return false
	}
	c.mu.Lock()
	if len(c.m) > 10000 {
		clear(c.m)
	}
	c.m[u.Name] = cachedCredential{hash: string(u.PasswordHash), mac: mac}
	c.mu.Unlock()
	return true
}

// authLimiter counts failed logins per client (an IPv4 address or an IPv6
// /64, clientKey) in a fixed window. Once a client has failed limit
// times, all its logins are refused until the window that started with
// its first login has passed.
type authLimiter struct {
	limit  int
	window time.Duration
	now    func() time.Time

	mu    sync.Mutex
	ended *sync.Cond // on mu: a check ended
	m     map[netip.Prefix]*failures
}

type failures struct {
	start    time.Time
	failed   int
	checking int // logins whose password is being compared now
}

// maxTrackedAddrs bounds the limiter's memory under a distributed attack.
const maxTrackedAddrs = 100000

func newAuthLimiter(limit int, window time.Duration, now func() time.Time) *authLimiter {
	if window <= 0 {
		window = time.Minute
	}
	l := &authLimiter{limit: limit, window: window, now: now, m: make(map[netip.Prefix]*failures)}
	l.ended = sync.NewCond(&l.mu)
	return l
}

// attempt lets a login from ip have its password checked, or reports
// false once the client has failed limit times. Checks in progress count
// against the limit too, so that parallel guesses cannot all be compared
// while each other's outcome is unknown: while they could reach the limit,
// a login waits for one of them to end, rather than being refused while
// it may be right (an application's workers log in at once). Each true
// is followed by one done.
func (l *authLimiter) attempt(ip netip.Addr) bool {
	if l.limit <= 0 {
		return true
	}
	k := clientKey(ip)
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		f := l.entry(k)
		if f.failed >= l.limit {
			return false
		}
		if f.failed+f.checking < l.limit {
			f.checking++
			return true
		}
		l.ended.Wait()
	}
}

// done ends a check that attempt let through: a failure counts, a
// success counts nothing.
func (l *authLimiter) done(ip netip.Addr, ok bool) {
	if l.limit <= 0 {
		return
	}
	k := clientKey(ip)
	l.mu.Lock()
	defer l.mu.Unlock()
	defer l.ended.Broadcast()
	f := l.m[k]
	if f == nil {
		return // pruned meanwhile
	}
	f.checking = max(f.checking-1, 0)
	if !ok {
		f.failed++
	}
	if f.failed == 0 && f.checking == 0 {
		delete(l.m, k) // the window starts again at the next login
	}
}

// entry returns k's counts, in a window that has not passed. l.mu must
// be held.
func (l *authLimiter) entry(k netip.Prefix) *failures {
	now := l.now()
	f := l.m[k]
	switch {
	case f == nil:
		if len(l.m) >= maxTrackedAddrs {
			l.prune(now)
		}
		f = &failures{start: now}
		l.m[k] = f
	case now.Sub(f.start) >= l.window:
		f.start, f.failed = now, 0
	}
	return f
}

// prune drops expired entries; if none expired, it drops everything rather
// than grow without bound.
func (l *authLimiter) prune(now time.Time) {
	for k, f := range l.m {
		if now.Sub(f.start) >= l.window {
			delete(l.m, k)
		}
	}
	if len(l.m) >= maxTrackedAddrs {
		clear(l.m)
	}
}

// loginServer is the server side of the obsolete but still common LOGIN
// mechanism (draft-murchison-sasl-login): go-sasl ships only its client.
// go-smtp does the base64 framing; this is just the two prompts.
type loginServer struct {
	step     int
	username string
	auth     func(username, password string) error
}

var _ sasl.Server = (*loginServer)(nil)

func (a *loginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch a.step {
	case 0:
		a.step = 1
		if response != nil { // initial response carries the user name
			a.username = string(response)
			a.step = 2
			return []byte("Password:"), false, nil
		}
		return []byte("Username:"), false, nil
	case 1:
		a.username = string(response)
		a.step = 2
		return []byte("Password:"), false, nil
	case 2:
		a.step = 3
		return nil, true, a.auth(a.username, string(response))
	}
	return nil, false, sasl.ErrUnexpectedClientResponse
}
