package metrics

import (
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"

	"smarthost/queue"
)

// Filter selects the queued messages that a bulk action applies to. Every
// field that is set must match; All selects every readable message and
// excludes the others.
type Filter struct {
	All  bool
	From AddrPattern // the envelope sender
	To   AddrPattern // any recipient still pending
	User string      // the authenticated submitter, exactly
}

// AddrPattern is "user@domain" (the local part compared exactly, the
// domain without regard to case), or "*@domain" or "@domain" for any
// address at the domain. The zero AddrPattern is unset.
type AddrPattern struct {
	local  string
	domain string
	any    bool // any local part
}

// ParseAddrPattern parses the value of a -from or -to filter.
func ParseAddrPattern(s string) (AddrPattern, error) {
	i := strings.LastIndexByte(s, '@')
	if i < 0 {
		return AddrPattern{}, fmt.Errorf("%q: want user@domain, *@domain or @domain", s)
	}
	local, domain := s[:i], s[i+1:]
	if domain == "" || strings.ContainsAny(domain, "*@") {
		return AddrPattern{}, fmt.Errorf("%q: want a domain after @, without wildcards", s)
	}
	p := AddrPattern{local: local, domain: domain}
	if local == "" || local == "*" {
		p.local, p.any = "", true
	}
	return p, nil
}

// IsSet reports whether p was parsed from a pattern.
func (p AddrPattern) IsSet() bool { return p.domain != "" }

// Match reports whether addr is an address p stands for. Domains compare
// without regard to case (RFC 5321 section 2.4); a local part may be case
// sensitive, so it compares exactly.
func (p AddrPattern) Match(addr string) bool {
	i := strings.LastIndexByte(addr, '@')
	if i < 0 || !strings.EqualFold(addr[i+1:], p.domain) {
		return false
	}
	return p.any || addr[:i] == p.local
}

func (p AddrPattern) String() string {
	if p.any {
		return "*@" + p.domain
	}
	return p.local + "@" + p.domain
}

// Match reports whether f selects m.
func (f Filter) Match(m *queue.Message) bool {
	if f.All {
		return true
	}
	if f.From.IsSet() && !f.From.Match(m.From) {
		return false
	}
	if f.To.IsSet() && !slices.ContainsFunc(m.Recipients, func(r queue.Recipient) bool {
		return r.State == queue.Pending && f.To.Match(r.Addr)
	}) {
		return false
	}
	if f.User != "" && m.User != f.User {
		return false
	}
	return f.From.IsSet() || f.To.IsSet() || f.User != ""
}

// String is f as the query that selects it, for logs.
func (f Filter) String() string {
	if f.All {
		return "all"
	}
	var parts []string
	if f.From.IsSet() {
		parts = append(parts, "from="+f.From.String())
	}
	if f.To.IsSet() {
		parts = append(parts, "to="+f.To.String())
	}
	if f.User != "" {
		parts = append(parts, "user="+f.User)
	}
	return strings.Join(parts, " ")
}

// parseBulkQuery reads the filter and dry_run of a bulk request. Acting on
// every message must be asked for with all=1: no filter is an error, as is
// a parameter this version does not know, so that a misspelt filter
// cannot widen what is changed.
func parseBulkQuery(q url.Values) (f Filter, dryRun bool, err error) {
	for k, vs := range q {
		switch k {
		case "from", "to", "user", "all", "dry_run":
		default:
			return f, false, fmt.Errorf("unknown parameter %q; filters are from, to, user or all=1, with dry_run=1", k)
		}
		if len(vs) != 1 {
			return f, false, fmt.Errorf("parameter %q given %d times", k, len(vs))
		}
		if vs[0] == "" {
			return f, false, fmt.Errorf("parameter %q is empty", k)
		}
	}
	flag := func(k string) (bool, error) {
		switch q.Get(k) {
		case "", "0":
			return false, nil
		case "1":
			return true, nil
		}
		return false, fmt.Errorf("%s=%q: want 1 or 0", k, q.Get(k))
	}
	if f.All, err = flag("all"); err != nil {
		return f, false, err
	}
	if dryRun, err = flag("dry_run"); err != nil {
		return f, false, err
	}
	if q.Has("from") {
		if f.From, err = ParseAddrPattern(q.Get("from")); err != nil {
			return f, false, fmt.Errorf("from: %w", err)
		}
	}
	if q.Has("to") {
		if f.To, err = ParseAddrPattern(q.Get("to")); err != nil {
			return f, false, fmt.Errorf("to: %w", err)
		}
	}
	f.User = q.Get("user")
	filtered := f.From.IsSet() || f.To.IsSet() || f.User != ""
	switch {
	case f.All && filtered:
		return f, false, errors.New("all=1 acts on every message: give it without from, to or user")
	case !f.All && !filtered:
		return f, false, errors.New("no filter: give from, to or user, or all=1 to act on every message")
	}
	return f, dryRun, nil
}

// skipReason says why a bulk action leaves a matching message as it is,
// judged from its listed state; "" if the action applies.
func skipReason(action string, m queue.Entry) string {
	switch action {
	case "hold":
		if m.Held {
			return "already held"
		}
	case "release":
		if !m.Held {
			return "not held"
		}
	case "retry":
		if m.Held {
			return "held"
		}
		if m.InFlight {
			return "in flight" // the attempt in progress is its retry
		}
	}
	return ""
}

// bulkWorkers bounds the changes a bulk action has in progress: enough for
// the bbolt store to group them into shared commits, and well within a
// PostgreSQL pool.
const bulkWorkers = 8

// bulk returns the handler of POST /api/queue/{action}: op applied to
// every queued message that the query's filter selects.
func (a *API) bulk(action string, op func(id string) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		f, dryRun, err := parseBulkQuery(r.URL.Query())
		if err != nil {
			writeError(w, http.StatusBadRequest, err.Error())
			return
		}
		msgs, bad, err := a.Queue.List()
		if err != nil {
			a.fail(w, r, err)
			return
		}
		res := ActionResult{Action: action, IDs: []string{}, DryRun: dryRun}
		var todo []string
		for _, m := range msgs {
			if !f.Match(&m.Message) {
				continue
			}
			if why := skipReason(action, m); why != "" {
				res.skip(why, 1)
				continue
			}
			todo = append(todo, m.ID)
		}
		if f.All && len(bad) > 0 {
			// Unreadable records are deleted one by one, by ID, once
			// looked at: "all" does not reach them.
			res.skip("unreadable", len(bad))
		}
		if dryRun {
			res.IDs = append(res.IDs, todo...)
			res.Messages = len(todo)
			writeJSON(w, http.StatusOK, res)
			return
		}

		errs := applyEach(todo, op)
		var failed error
		for i, err := range errs {
			switch {
			case err == nil:
				res.IDs = append(res.IDs, todo[i])
			case errors.Is(err, queue.ErrNotFound):
				res.skip("gone", 1) // delivered or deleted since the list
			case errors.Is(err, queue.ErrHeld):
				res.skip("held", 1)
			case failed == nil:
				failed = err
			}
		}
		res.Messages = len(res.IDs)
		if res.Messages > 0 || failed == nil {
			a.Logger.Info("queue: "+action+" by administrator", "filter", f.String(), "messages", res.Messages, "skipped", res.Skipped, "client", r.RemoteAddr)
		}
		if failed != nil {
			a.Logger.Error("admin API: bulk queue operation failed", "action", action, "filter", f.String(), "err", failed)
			writeError(w, http.StatusInternalServerError, fmt.Sprintf("%s: done on %d of %d messages, then: %v", action, res.Messages, len(todo), failed))
			return
		}
		writeJSON(w, http.StatusOK, res)
	}
}

// skip counts n matching messages left as they are, for why.
func (r *ActionResult) skip(why string, n int) {
	if r.SkippedBecause == nil {
		r.SkippedBecause = map[string]int{}
	}
	r.SkippedBecause[why] += n
	r.Skipped += n
}

// applyEach runs op on every ID, a few at a time, and returns each one's
// error in the order of ids.
func applyEach(ids []string, op func(id string) error) []error {
	errs := make([]error, len(ids))
	next := make(chan int)
	var wg sync.WaitGroup
	for range min(bulkWorkers, len(ids)) {
		wg.Go(func() {
			for i := range next {
				errs[i] = op(ids[i])
			}
		})
	}
	for i := range ids {
		next <- i
	}
	close(next)
	wg.Wait()
	return errs
}
