package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"smarthost/metrics"
)

// findFlags are the flags of `smarthost queue find`; to, from and user
// are the bulk commands' flags, which find reads as whole addresses.
type findFlags struct {
	msgID string
	since time.Duration
	limit int
}

// findQuery is the query of GET /api/messages for find's flags.
func findQuery(bf bulkFlags, ff findFlags, now time.Time) (url.Values, error) {
	q := url.Values{}
	for name, v := range map[string]string{"to": bf.to, "from": bf.from} {
		if !bf.given(name) {
			continue
		}
		if !strings.Contains(v, "@") || strings.Contains(v, "*") || strings.HasPrefix(v, "@") {
			return nil, fmt.Errorf("-%s %q: find takes a whole address, user@domain", name, v)
		}
		q.Set(name, v)
	}
	if bf.given("user") {
		if bf.user == "" {
			return nil, errors.New("-user needs a user name")
		}
		q.Set("user", bf.user)
	}
	if ff.msgID != "" {
		q.Set("msg_id", ff.msgID)
	}
	if ff.since < 0 {
		return nil, errors.New("-since must be positive")
	}
	if ff.since > 0 {
		q.Set("since", now.Add(-ff.since).UTC().Format(time.RFC3339Nano))
	}
	if ff.limit != 0 {
		q.Set("limit", strconv.Itoa(ff.limit))
	}
	return q, nil
}

// find prints the messages, queued or gone, that q selects, newest first.
func (c *queueClient) find(q url.Values, asJSON bool, stdout io.Writer) error {
	page, err := answer[[]metrics.MessageHistory](c, http.MethodGet, "/api/messages?"+q.Encode(), asJSON, stdout)
	if err != nil || page == nil {
		return err
	}
	found := *page
	if len(found) == 0 {
		fmt.Fprintln(stdout, "no message found")
		return nil
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tRECEIVED\tSTATE\tFROM\tRECIPIENTS\tMESSAGE-ID")
	for _, h := range found {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", printable(h.ID), timestamp(h.Received), printable(h.State),
			sender(h.From), printable(oneLine(strings.Join(h.Recipients, " "), 60)), printable(oneLine(h.MessageID, 40)))
	}
	return tw.Flush()
}

// history prints one message's history: what it is, then its events in
// order.
func (c *queueClient) history(id string, asJSON bool, stdout io.Writer) error {
	h, err := answer[metrics.MessageHistory](c, http.MethodGet, "/api/messages/"+url.PathEscape(id), asJSON, stdout)
	if err != nil || h == nil {
		return err
	}
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("ID", printable(h.ID))
	row("State", printable(h.State))
	row("Received", timestamp(h.Received))
	if !h.Left.IsZero() {
		row("Left", timestamp(h.Left))
	}
	row("From", sender(h.From))
	if h.User != "" {
		row("User", printable(h.User))
	}
	if h.MessageID != "" {
		row("Message-ID", printable(h.MessageID))
	}
	row("Recipients", printable(strings.Join(h.Recipients, " ")))
	tw.Flush()
	fmt.Fprintln(stdout, "Events:")
	tw = tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	for _, ev := range h.Events {
		detail := ev.Reply
		if ev.DSNID != "" {
			detail = "DSN " + ev.DSNID
		}
		via := ev.Upstream
		if ev.Relay != "" {
			via += " (" + ev.Relay + ")"
		}
		attempt := ""
		if ev.Attempt > 0 {
			attempt = "#" + strconv.Itoa(ev.Attempt)
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\t%s\n", timestamp(ev.At), printable(string(ev.Type)), attempt,
			printable(ev.Rcpt), printable(via), printable(strings.Join(strings.Fields(detail), " ")))
	}
	return tw.Flush()
}
