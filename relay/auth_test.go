package relay

import (
	"bytes"
	"encoding/base64"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"
)

// TestUnknownUserCostsAsMuch: the hash compared for an unknown name has
// the cost of the configured users' hashes, so that the login's time does
// not tell which names exist.
func TestUnknownUserCostsAsMuch(t *testing.T) {
	const cost = 8
	hash, err := bcrypt.GenerateFromPassword([]byte(testPassword), cost)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	env := startServer(t, func(s *Server) {
		s.Users = []User{{Name: "app", PasswordHash: hash, AllowedFrom: []string{"*@example.com"}}}
		s.Limits.AuthFailuresPerIP = 100
		s.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	})
	if got, err := bcrypt.Cost(env.srv.users.Load().dummy); err != nil || got != cost {
		t.Fatalf("dummy hash cost %d (%v), want %d", got, err, cost)
	}
	c := dial(t, env.addrs[0])
	c.expect(250, "EHLO client.test")
	c.startTLS(env.pki.ClientTLS())
	c.expect(250, "EHLO client.test")
	// Medians of several tries, compared with a margin wide enough for a
	// busy machine: the cost of the default hash (10) against 8 would be
	// 4 times the time.
	median := func(user string) time.Duration {
		var d []time.Duration
		for range 7 {
			start := time.Now()
			if code, _ := c.authPlain(user, "not the password"); code != 535 {
				t.Fatalf("AUTH %s: %d", user, code)
			}
			d = append(d, time.Since(start))
		}
		slices.Sort(d)
		return d[len(d)/2]
	}
	known, unknown := median("app"), median("nobody")
	if ratio := float64(unknown) / float64(known); ratio > 2.5 || ratio < 0.4 {
		t.Errorf("unknown user %v, known user %v: ratio %.2f", unknown, known, ratio)
	}

	// Mixed costs cannot be hidden: the operator is told.
	other, err := bcrypt.GenerateFromPassword([]byte("x"), cost+1)
	if err != nil {
		t.Fatal(err)
	}
	env.srv.SetUsers([]User{{Name: "app", PasswordHash: hash}, {Name: "b", PasswordHash: other}})
	if got, _ := bcrypt.Cost(env.srv.users.Load().dummy); got != cost+1 {
		t.Errorf("dummy cost with mixed users %d, want the highest, %d", got, cost+1)
	}
	if !strings.Contains(logs.String(), "different bcrypt costs") {
		t.Errorf("no warning about mixed costs:\n%s", logs.String())
	}
}

// TestParallelLoginsNotRefused: more logins at once from one address than
// auth_failures_per_ip, all with the right password (an application's
// workers starting together), all succeed: a login waits for the checks
// in progress rather than being refused as if they had failed.
func TestParallelLoginsNotRefused(t *testing.T) {
	// A realistic cost keeps each check in progress long enough for the
	// logins to overlap.
	hash, err := bcrypt.GenerateFromPassword([]byte(testPassword), 10)
	if err != nil {
		t.Fatal(err)
	}
	const limit, parallel = 3, 12
	env := startServer(t, func(s *Server) {
		s.Users = []User{{Name: "app", PasswordHash: hash, AllowedFrom: []string{"app@example.com"}}}
		s.Limits.AuthFailuresPerIP = limit
	})
	clients := make([]*client, parallel)
	for i := range clients {
		c := dial(t, env.addrs[0])
		c.expect(250, "EHLO client.test")
		c.startTLS(env.pki.ClientTLS())
		c.expect(250, "EHLO client.test")
		c.conn.SetDeadline(time.Now().Add(30 * time.Second))
		clients[i] = c
	}
	ir := base64.StdEncoding.EncodeToString([]byte("\x00app\x00" + testPassword))
	codes := make([]int, parallel)
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() {
			if err := c.tp.PrintfLine("AUTH PLAIN %s", ir); err != nil {
				return
			}
			codes[i], _, _ = c.tp.ReadResponse(0)
		})
	}
	wg.Wait()
	for i, code := range codes {
		if code != 235 {
			t.Errorf("login %d of %d at once with the right password: %d", i, parallel, code)
		}
	}
}
