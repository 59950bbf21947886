package e2e

import (
	"encoding/json"
	"errors"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"smarthost/internal/testpki"
)

// connectAs is connect for another user of the configuration.
func connectAs(t *testing.T, addr string, pki *testpki.PKI, user, password string) *submitter {
	t.Helper()
	c, err := smtp.DialStartTLS(addr, pki.ClientTLS())
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Auth(sasl.NewPlainClient("", user, password)); err != nil {
		c.Close()
		t.Fatal(err)
	}
	return &submitter{c: c}
}

// TestQueueBulk: the filters of `smarthost queue hold|retry|release|delete`
// act on exactly the matching messages of a running relay, print how many,
// and a dry run changes nothing.
func TestQueueBulk(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	upAddr, _ := reserveAddr(t) // the upstream is down: everything stays queued
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: upAddr, RetryMin: "1h", RetryMax: "2h",
		Extra: userTable(t, "ops", "ops-password")}))

	// Three messages of the e2e user to bob; three of ops, two to carol
	// and one to bob.
	send := func(s *submitter, from, to string) string {
		t.Helper()
		id, err := s.send(from, []string{to}, testMsg)
		if err != nil {
			t.Fatal(err)
		}
		return id
	}
	s := connect(t, r.addr, pki)
	var app, ops []string
	for range 3 {
		app = append(app, send(s, "app@example.com", "bob@example.net"))
	}
	s.close()
	s = connectAs(t, r.addr, pki, "ops", "ops-password")
	ops = append(ops, send(s, "billing@example.com", "carol@example.org"), send(s, "billing@example.com", "carol@example.org"),
		send(s, "billing@example.com", "bob@example.net"))
	s.close()
	all := append(slices.Clone(app), ops...)
	for _, id := range all {
		r.waitLog("deferred", map[string]string{"queue_id": id}, 20*time.Second)
	}

	// queue runs a command that must succeed.
	queue := func(args ...string) string {
		t.Helper()
		out, err := queueCLI(t, r, adminToken, args...)
		if err != nil {
			t.Fatalf("queue %v: %v\n%s", args, err, out)
		}
		return out
	}
	// heldIDs are the queued messages that are held, and queued all that are.
	state := func() (heldIDs, queued []string) {
		t.Helper()
		for id, m := range listQueue(t, r) {
			queued = append(queued, id)
			if m.Held {
				heldIDs = append(heldIDs, id)
			}
		}
		sort.Strings(heldIDs)
		sort.Strings(queued)
		return heldIDs, queued
	}
	sorted := func(ids ...string) []string {
		ids = slices.Clone(ids)
		sort.Strings(ids)
		return ids
	}

	if out := queue("hold", "-from", "billing@example.com"); out != "held 3 messages\n" {
		t.Errorf("hold -from: %q", out)
	}
	if held, _ := state(); !slices.Equal(held, sorted(ops...)) {
		t.Errorf("held %v, want the ops messages %v", held, sorted(ops...))
	}

	// A dry run lists every message and deletes none.
	out := queue("delete", "-all", "-dry-run")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if lines[0] != "would delete 6 messages:" || !slices.Equal(sorted(lines[1:]...), sorted(all...)) {
		t.Errorf("delete -all -dry-run:\n%s", out)
	}
	if _, queued := state(); !slices.Equal(queued, sorted(all...)) {
		t.Errorf("a dry run changed the queue: %v", queued)
	}

	// Retry of held messages skips them; of the others, starts an attempt.
	if out := queue("retry", "-user", "ops"); out != "retried 0 messages\nskipped 3: held\n" {
		t.Errorf("retry -user ops: %q", out)
	}
	if out := queue("retry", "-user", userName); out != "retried 3 messages\n" {
		t.Errorf("retry -user %s: %q", userName, out)
	}
	for _, id := range app {
		r.waitLog("deferred", map[string]string{"queue_id": id, "attempt": "2"}, 20*time.Second)
	}

	if out := queue("delete", "-to", "bob@example.net"); out != "deleted 4 messages\n" {
		t.Errorf("delete -to: %q", out)
	}
	held, queued := state()
	if want := sorted(ops[0], ops[1]); !slices.Equal(queued, want) || !slices.Equal(held, want) {
		t.Errorf("after delete -to bob: queued %v, held %v; want both %v", queued, held, want)
	}

	var res struct {
		Action   string   `json:"action"`
		Messages int      `json:"messages"`
		IDs      []string `json:"ids"`
	}
	if err := json.Unmarshal([]byte(queue("-json", "release", "-to", "*@example.org")), &res); err != nil {
		t.Fatal(err)
	}
	if res.Action != "release" || res.Messages != 2 || !slices.Equal(sorted(res.IDs...), sorted(ops[0], ops[1])) {
		t.Errorf("-json release -to: %+v", res)
	}
	if held, _ := state(); len(held) != 0 {
		t.Errorf("still held after release: %v", held)
	}

	// Usage errors change nothing and exit 2.
	for _, args := range [][]string{
		{"delete"},
		{"delete", "-all", ops[0]},
		{"delete", "-all", "-user", "ops"},
		{"delete", "-from", "example.com"},
	} {
		out, err := queueCLI(t, r, adminToken, args...)
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 {
			t.Errorf("queue %v: %v, want exit 2\n%s", args, err, out)
		}
	}
	if _, queued := state(); len(queued) != 2 {
		t.Errorf("usage errors changed the queue: %v", queued)
	}
}
