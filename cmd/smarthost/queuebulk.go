package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	"smarthost/metrics"
)

// bulkCommands are the commands that take filters instead of an ID.
var bulkCommands = map[string]bool{"retry": true, "hold": true, "release": true, "delete": true}

// bulkTimeout bounds a bulk request: longer than the minute in which the
// server must answer, so that its bound, not the client's, ends a long one.
const bulkTimeout = 2 * time.Minute

// bulkFlags are the filters of a bulk command.
type bulkFlags struct {
	from, to, user string
	all, dryRun    bool
	set            []string // the flags given, by name
}

func (b *bulkFlags) given(name string) bool { return slices.Contains(b.set, name) }

// selects reports whether the flags ask for a bulk action.
func (b *bulkFlags) selects() bool {
	return b.all || b.given("from") || b.given("to") || b.given("user")
}

// check returns what is wrong with the bulk flags of cmd, given with the
// arguments ids.
func (b *bulkFlags) check(cmd string, ids []string) error {
	filtered := b.given("from") || b.given("to") || b.given("user")
	switch {
	case !bulkCommands[cmd]:
		return errors.New("-from, -to, -user, -all and -dry-run are for retry, hold, release and delete")
	case !b.selects():
		return errors.New("-dry-run needs -from, -to, -user or -all")
	case len(ids) > 0:
		return errors.New("give one message ID or filters, not both")
	case b.all && filtered:
		return errors.New("-all acts on every message: give it without -from, -to or -user")
	case b.given("user") && b.user == "":
		return errors.New("-user needs a user name")
	}
	for name, v := range map[string]string{"from": b.from, "to": b.to} {
		if !b.given(name) {
			continue
		}
		if _, err := metrics.ParseAddrPattern(v); err != nil {
			return fmt.Errorf("-%s %w", name, err)
		}
	}
	return nil
}

// query is the flags as the API's parameters.
func (b *bulkFlags) query() string {
	q := url.Values{}
	if b.all {
		q.Set("all", "1")
	}
	for name, v := range map[string]string{"from": b.from, "to": b.to, "user": b.user} {
		if b.given(name) {
			q.Set(name, v)
		}
	}
	if b.dryRun {
		q.Set("dry_run", "1")
	}
	return q.Encode()
}

// bulk applies cmd to every message that b selects, or with -dry-run
// lists them.
func (c *queueClient) bulk(cmd string, b bulkFlags, asJSON bool, stdout io.Writer) error {
	c.http.Timeout = bulkTimeout
	res, err := answer[metrics.ActionResult](c, http.MethodPost, "/api/queue/"+cmd+"?"+b.query(), asJSON, stdout)
	if err != nil || res == nil {
		return err
	}
	printBulk(stdout, *res)
	return nil
}

// bulkDone is each bulk action in the past tense.
var bulkDone = map[string]string{"retry": "retried", "hold": "held", "release": "released", "delete": "deleted"}

// printBulk writes how many messages a bulk action changed, or with a dry
// run would change, followed then by their IDs, and those it left as they
// are, by why.
func printBulk(w io.Writer, r metrics.ActionResult) {
	action := printable(r.Action)
	n := fmt.Sprintf("%d %s", r.Messages, plural(r.Messages, "message", "messages"))
	switch {
	case r.DryRun && r.Messages > 0:
		fmt.Fprintf(w, "would %s %s:\n", action, n)
		for _, id := range r.IDs {
			fmt.Fprintln(w, printable(id))
		}
	case r.DryRun:
		fmt.Fprintf(w, "would %s %s\n", action, n)
	case bulkDone[r.Action] != "":
		fmt.Fprintf(w, "%s %s\n", bulkDone[r.Action], n)
	default:
		fmt.Fprintf(w, "%s: %s\n", action, n)
	}
	if r.Skipped == 0 {
		return
	}
	skipped := "skipped"
	if r.DryRun {
		skipped = "would skip"
	}
	reasons := make([]string, 0, len(r.SkippedBecause))
	for why := range r.SkippedBecause {
		reasons = append(reasons, why)
	}
	slices.Sort(reasons)
	if len(reasons) == 1 && r.SkippedBecause[reasons[0]] == r.Skipped {
		fmt.Fprintf(w, "%s %d: %s\n", skipped, r.Skipped, printable(reasons[0]))
		return
	}
	parts := make([]string, len(reasons))
	for i, why := range reasons {
		parts[i] = fmt.Sprintf("%d %s", r.SkippedBecause[why], printable(why))
	}
	fmt.Fprintf(w, "%s %d: %s\n", skipped, r.Skipped, strings.Join(parts, ", "))
}
