package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
	"unicode/utf8"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/metrics"
	"smarthost/queue"
)

const queueUsage = `usage: smarthost queue [-server URL] [-config PATH] [-json] COMMAND

Commands (they talk to the running server's admin API):
  list          every queued message: ID, age, sender, recipients with their
                state, attempts, next attempt, last reply, flags; a message
                whose record cannot be read shows as unreadable, with why
  show ID       every detail of one message, with each recipient's reply
  history ID    what happened to a message, queued or gone within [history]
                retention: when it was accepted, each attempt's outcome for
                each recipient (upstream, server, reply), its DSNs, and what
                an administrator did
  find          messages queued or gone, newest first: -to ADDRESS,
                -from ADDRESS, -user NAME, -msg-id ID, -since DURATION
                (such as 24h), -limit N; any together
  cat ID        the message's content as it will be sent (DKIM signature
                included); -headers: its header section only. To a
                terminal, control characters are shown escaped; to a file
                or a pipe, the bytes are written exactly
  retry ID      make the message due now
  hold ID       keep the message out of delivery until release
  release ID    let a held message be delivered again, now
  delete ID     remove the message; no bounce is sent
  flush         make every message that is not held due now

  retry|hold|release|delete -from A | -to A | -user U | -all [-dry-run]
                instead of one ID, every queued message that the filters
                select (all of those given must match): -from the envelope
                sender, -to a recipient still to be delivered, -user the
                user who submitted it; an address A is user@domain, or
                *@domain for any at the domain; -all every message (it
                cannot be combined with a filter). Prints how many were
                changed, and how many matched but were left as they are
                and why (retry of a held message, say). -dry-run changes
                nothing and lists the IDs it would change

  salvage -path FILE -out NEWFILE
                copy every message that can still be read from the queue
                file FILE, which a relay refuses as damaged, into the new
                queue file NEWFILE, with its state and spool file; print
                what was saved and, one line each, what was lost and why.
                FILE is only read; the relay using it must be stopped, and
                NEWFILE must not exist. Exit 0: all saved; 1: something
                lost (NEWFILE is written all the same) or nothing could
                be done; 2: usage. Works on the files, not the API.

  import -from FILE [-config PATH]
                copy every message of the queue file FILE, which a stopped
                relay used, into the queue that the configuration names
                (the shared PostgreSQL queue, say), keeping IDs, recipients'
                states and attempts. A message the queue already has is
                left as it is, so running it again copies nothing twice.
                FILE is only read. Exit 0: all copied; 1: something could
                not be; 2: usage. Works on the storage, not the API.

-server defaults to the [http] address of the configuration (-config, default
$SMARTHOST_CONFIG, else /etc/smarthost/config.toml), else http://127.0.0.1:9090.
The bearer token is read from the variable named by [http] admin_token_env,
else from $SMARTHOST_ADMIN_TOKEN.
`

// defaultTokenEnv holds the admin token when the configuration names none.
const defaultTokenEnv = "SMARTHOST_ADMIN_TOKEN"

// defaultServerURL is used when there is no configuration file.
const defaultServerURL = "http://" + config.DefaultHTTPAddress

// queueCommands maps each subcommand to whether it takes a message ID.
var queueCommands = map[string]bool{
	"list": false, "flush": false,
	"show": true, "cat": true, "retry": true, "hold": true, "release": true, "delete": true,
	"history": true, "find": false,
}

func runQueue(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("queue", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, queueUsage) }
	server := fs.String("server", "", "admin API base URL (default: from the configuration's [http] address)")
	configPath := fs.String("config", defaultConfigPath(), "configuration file to read [http] from (env SMARTHOST_CONFIG)")
	asJSON := fs.Bool("json", false, "print the API's JSON")
	headers := fs.Bool("headers", false, "cat: the header section only")
	var bf bulkFlags
	fs.StringVar(&bf.from, "from", "", "retry|hold|release|delete: messages from this sender (user@domain or *@domain)")
	fs.StringVar(&bf.to, "to", "", "retry|hold|release|delete: messages with this recipient still pending")
	fs.StringVar(&bf.user, "user", "", "retry|hold|release|delete: messages submitted by this user")
	fs.BoolVar(&bf.all, "all", false, "retry|hold|release|delete: every message")
	fs.BoolVar(&bf.dryRun, "dry-run", false, "with -from, -to, -user or -all: list the messages, change nothing")
	var ff findFlags
	fs.StringVar(&ff.msgID, "msg-id", "", "find: messages with this Message-ID")
	fs.DurationVar(&ff.since, "since", 0, "find: messages received within this long, such as 24h")
	fs.IntVar(&ff.limit, "limit", 0, "find: at most this many, newest first (default and at most 1000)")
	// Flags may also follow the command ("list -json"): parse again after
	// each positional argument.
	var words []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			return 2
		}
		if fs.NArg() == 0 {
			break
		}
		words = append(words, fs.Arg(0))
		rest = fs.Args()[1:]
		if len(words) == 1 && words[0] == "salvage" {
			return runSalvage(rest, stdout, stderr)
		}
		if len(words) == 1 && words[0] == "import" {
			return runImport(rest, stdout, stderr)
		}
	}
	if len(words) == 0 {
		fmt.Fprint(stderr, queueUsage)
		return 2
	}
	cmd, ids := words[0], words[1:]
	needsID, known := queueCommands[cmd]
	fs.Visit(func(f *flag.Flag) { bf.set = append(bf.set, f.Name) })
	bulk := bf.selects() && cmd != "find"
	var findQ url.Values
	switch {
	case !known:
		fmt.Fprintf(stderr, "smarthost queue: unknown command %q\n\n%s", cmd, queueUsage)
		return 2
	case cmd != "find" && (bf.given("msg-id") || bf.given("since") || bf.given("limit")):
		fmt.Fprintf(stderr, "smarthost queue %s: -msg-id, -since and -limit are for find\n", cmd)
		return 2
	case cmd == "find":
		var err error
		if findQ, err = findQuery(bf, ff, time.Now()); err == nil && (len(ids) > 0 || bf.all || bf.dryRun) {
			err = errors.New("takes -to, -from, -user, -msg-id, -since and -limit, no arguments")
		}
		if err != nil {
			fmt.Fprintf(stderr, "smarthost queue find: %v\n", err)
			return 2
		}
	case *headers && cmd != "cat":
		fmt.Fprintf(stderr, "smarthost queue %s: -headers is for cat only\n", cmd)
		return 2
	case bulk || bf.dryRun:
		if err := bf.check(cmd, ids); err != nil {
			fmt.Fprintf(stderr, "smarthost queue %s: %v\n", cmd, err)
			return 2
		}
	case needsID && len(ids) != 1 && bulkCommands[cmd]:
		fmt.Fprintf(stderr, "smarthost queue %s: want one message ID, or -from, -to, -user or -all\n", cmd)
		return 2
	case needsID && len(ids) != 1:
		fmt.Fprintf(stderr, "smarthost queue %s: want one message ID\n", cmd)
		return 2
	case !needsID && len(ids) != 0:
		fmt.Fprintf(stderr, "smarthost queue %s: takes no arguments\n", cmd)
		return 2
	}

	c, err := newQueueClient(*server, *configPath)
	if err != nil {
		fmt.Fprintln(stderr, "smarthost queue:", err)
		return 1
	}
	switch {
	case cmd == "cat":
		err = c.cat(ids[0], *headers, stdout)
	case cmd == "history":
		err = c.history(ids[0], *asJSON, stdout)
	case cmd == "find":
		err = c.find(findQ, *asJSON, stdout)
	case bulk:
		err = c.bulk(cmd, bf, *asJSON, stdout)
	default:
		err = c.run(cmd, ids, *asJSON, stdout)
	}
	if err != nil {
		fmt.Fprintln(stderr, "smarthost queue:", err)
		return 1
	}
	return 0
}

// runSalvage is `smarthost queue salvage`: from a damaged queue file to a
// new one, through the queue package's reader, never the API (the relay
// must be stopped).
func runSalvage(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("queue salvage", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, queueUsage) }
	path := fs.String("path", "", "the damaged queue file, only read")
	out := fs.String("out", "", "the new queue file to write; must not exist")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	switch {
	case *path == "" || *out == "":
		fmt.Fprintln(stderr, "smarthost queue salvage: -path FILE and -out NEWFILE are both required")
		return 2
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "smarthost queue salvage: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	from, err1 := filepath.Abs(*path)
	to, err2 := filepath.Abs(*out)
	if err := errors.Join(err1, err2); err != nil {
		fmt.Fprintln(stderr, "smarthost queue salvage:", err)
		return 2
	}
	if from == to {
		fmt.Fprintln(stderr, "smarthost queue salvage: -out must be a new file, not -path")
		return 2
	}
	// Never onto an existing queue, nor its spool directory.
	for _, p := range []string{to, to + ".spool"} {
		if _, err := os.Lstat(p); err == nil {
			fmt.Fprintf(stderr, "smarthost queue salvage: %s exists; -out must name a new file\n", p)
			return 2
		}
	}

	src, err := queue.OpenSalvage(from)
	if err != nil {
		if errors.Is(err, queue.ErrLocked) {
			err = fmt.Errorf("%s is in use by a running relay: stop it first", from)
		}
		fmt.Fprintln(stderr, "smarthost queue salvage:", err)
		return 1
	}
	defer src.Close()
	dst, err := queue.Open(to, queue.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		fmt.Fprintln(stderr, "smarthost queue salvage:", err)
		return 1
	}
	rep, err := src.CopyTo(context.Background(), dst)
	if cerr := dst.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		fmt.Fprintf(stderr, "smarthost queue salvage: %v\n%s may be incomplete: remove it (and %s.spool) before trying again\n", err, to, to)
		return 1
	}
	printSalvage(stdout, rep, from, to)
	if len(rep.Lost) > 0 || rep.Unnamed != 0 {
		return 1
	}
	return 0
}

// printSalvage writes the report: the damage found, one line per message
// lost, and what was saved.
// printUnsure lists the messages a salvage or an import saved on hold
// because it could not tell whether they had already left the queue.
func printUnsure(w io.Writer, ids []string) {
	for _, id := range ids {
		fmt.Fprintf(w, "held %s: found only in a page outside the damaged tree or in the journal, maybe an old copy or a message already sent; check it, then release or delete it\n", printable(id))
	}
}

func printSalvage(w io.Writer, rep *queue.SalvageReport, from, to string) {
	for _, d := range rep.Damage {
		fmt.Fprintf(w, "damage: %s\n", printable(d))
	}
	for _, m := range rep.Lost {
		fmt.Fprintf(w, "lost %s: %s\n", printable(m.ID), printable(m.Reason))
	}
	printUnsure(w, rep.Unsure)
	fmt.Fprintf(w, "saved %d %s to %s", rep.Saved, plural(rep.Saved, "message", "messages"), to)
	var notes []string
	if rep.Spooled > 0 {
		notes = append(notes, fmt.Sprintf("%d with a spool file", rep.Spooled))
	}
	if rep.Held > 0 {
		notes = append(notes, fmt.Sprintf("%d held", rep.Held))
	}
	if rep.Journal > 0 {
		notes = append(notes, fmt.Sprintf("%d from the journal", rep.Journal))
	}
	if len(rep.Unsure) > 0 {
		notes = append(notes, fmt.Sprintf("%d of them to check", len(rep.Unsure)))
	}
	if len(notes) > 0 {
		fmt.Fprintf(w, " (%s)", strings.Join(notes, ", "))
	}
	fmt.Fprintln(w)
	if len(rep.Lost) > 0 {
		fmt.Fprintf(w, "lost %d %s, listed above\n", len(rep.Lost), plural(len(rep.Lost), "message", "messages"))
	}
	switch {
	case rep.Unnamed > 0:
		fmt.Fprintf(w, "lost %d more %s that %s counts, whose IDs are in damaged pages\n", rep.Unnamed, plural(rep.Unnamed, "message", "messages"), from)
	case rep.Unnamed < 0:
		fmt.Fprintln(w, "lost an unknown number of other messages: the pages that list and count them are damaged")
	}
	if len(rep.Lost) > 0 || rep.Unnamed != 0 {
		fmt.Fprintf(w, "keep %s: salvage did not change it, and it holds what could not be saved\n", from)
	}
	fmt.Fprintf(w, "start the relay with [queue] path = %q to deliver what was saved\n", to)
}

// queueClient talks to the admin API of a running server.
type queueClient struct {
	base     string // "http://127.0.0.1:9090", no trailing slash
	token    string
	tokenEnv string // where token came from, for error messages
	http     *http.Client
	now      func() time.Time
}

// newQueueClient finds the server and the token: an explicit server URL
// wins over the configuration's [http] address, and a configuration file
// that does not exist leaves the defaults.
func newQueueClient(server, configPath string) (*queueClient, error) {
	cfg, err := config.ReadAdminEndpoint(configPath)
	if err != nil {
		return nil, err
	}

	c := &queueClient{tokenEnv: defaultTokenEnv, http: &http.Client{Timeout: 30 * time.Second}, now: time.Now}
	if cfg.AdminTokenEnv != "" {
		c.tokenEnv = cfg.AdminTokenEnv
	}
	c.token = os.Getenv(c.tokenEnv)

	switch {
	case server != "":
		base, err := parseServerURL(server)
		if err != nil {
			return nil, err
		}
		c.base = base
	case cfg.Address != "":
		base, err := httpAddressURL(cfg.Address)
		if err != nil {
			return nil, fmt.Errorf("config %s: [http] address: %w", configPath, err)
		}
		c.base = base
	default:
		c.base = defaultServerURL
	}
	return c, nil
}

// parseServerURL accepts "http://host:port", "https://…" or a bare
// "host:port".
func parseServerURL(s string) (string, error) {
	if !strings.Contains(s, "://") {
		s = "http://" + s
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return "", fmt.Errorf("-server %q: want a URL such as http://127.0.0.1:9090", s)
	}
	return strings.TrimSuffix(u.String(), "/"), nil
}

// httpAddressURL turns a listen address into the URL to reach it on this
// machine: an empty or unspecified host (all interfaces) is reached on
// loopback.
func httpAddressURL(addr string) (string, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return "", fmt.Errorf("%q is not host:port", addr)
	}
	switch host {
	case "", "0.0.0.0":
		host = "127.0.0.1"
	case "::":
		host = "::1"
	}
	return "http://" + net.JoinHostPort(host, port), nil
}

func (c *queueClient) run(cmd string, ids []string, asJSON bool, stdout io.Writer) error {
	var method, path string
	switch cmd {
	case "list":
		method, path = http.MethodGet, "/api/queue"
	case "flush":
		method, path = http.MethodPost, "/api/queue/flush"
	case "show":
		method, path = http.MethodGet, "/api/queue/"+url.PathEscape(ids[0])
	case "delete":
		method, path = http.MethodDelete, "/api/queue/"+url.PathEscape(ids[0])
	default: // retry, hold, release
		method, path = http.MethodPost, "/api/queue/"+url.PathEscape(ids[0])+"/"+cmd
	}
	switch cmd {
	case "list":
		msgs, err := answer[[]metrics.MessageInfo](c, method, path, asJSON, stdout)
		if err != nil || msgs == nil {
			return err
		}
		printQueueList(stdout, *msgs, c.now())
	case "show":
		m, err := answer[metrics.MessageInfo](c, method, path, asJSON, stdout)
		if err != nil || m == nil {
			return err
		}
		printQueueMessage(stdout, *m, c.now())
	default:
		res, err := answer[metrics.ActionResult](c, method, path, asJSON, stdout)
		if err != nil || res == nil {
			return err
		}
		fmt.Fprintln(stdout, actionLine(*res))
	}
	return nil
}

// answer sends one request and returns its answer decoded as a T; with
// asJSON it prints the answer as the API sent it instead, and returns
// nil.
func answer[T any](c *queueClient, method, path string, asJSON bool, stdout io.Writer) (*T, error) {
	body, err := c.call(method, path)
	if err != nil {
		return nil, err
	}
	if asJSON {
		return nil, printJSON(stdout, body)
	}
	var v T
	if err := json.Unmarshal(body, &v); err != nil {
		return nil, fmt.Errorf("server sent an unexpected answer: %w", err)
	}
	return &v, nil
}

// printJSON writes the API's answer body indented, for -json.
func printJSON(w io.Writer, body []byte) error {
	var out bytes.Buffer
	if err := json.Indent(&out, bytes.TrimSpace(body), "", "  "); err != nil {
		return fmt.Errorf("server sent invalid JSON: %w", err)
	}
	out.WriteByte('\n')
	_, err := out.WriteTo(w)
	return err
}

// call sends one request and returns the body of a 2xx answer; any other
// answer becomes an error that says what to do about it.
func (c *queueClient) call(method, path string) ([]byte, error) {
	req, err := http.NewRequest(method, c.base+path, nil)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := c.do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, c.base+path, err)
	}
	return body, nil
}

// do sends req with the token and returns a 2xx answer, whose body the
// caller closes; any other answer becomes an error that says what to do
// about it.
func (c *queueClient) do(req *http.Request) (*http.Response, error) {
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("cannot reach smarthost at %s (is it running? set -server or [http] address): %w", c.base, err)
	}
	if resp.StatusCode/100 == 2 {
		return resp, nil
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var apiErr metrics.APIError
	msg := strings.TrimSpace(string(body))
	if json.Unmarshal(body, &apiErr) == nil && apiErr.Error != "" {
		msg = apiErr.Error
	}
	msg = printable(msg)
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		if c.token == "" {
			return nil, fmt.Errorf("unauthorized: set $%s to the server's admin token", c.tokenEnv)
		}
		return nil, fmt.Errorf("unauthorized: the server refused the token in $%s", c.tokenEnv)
	case http.StatusForbidden:
		return nil, fmt.Errorf("forbidden: %s", msg)
	}
	if msg == "" {
		msg = http.StatusText(resp.StatusCode)
	}
	return nil, fmt.Errorf("%s (HTTP %d)", msg, resp.StatusCode)
}

func actionLine(r metrics.ActionResult) string {
	r.ID, r.Action = printable(r.ID), printable(r.Action)
	switch r.Action {
	case "retry":
		return r.ID + ": due now"
	case "hold":
		return r.ID + ": held"
	case "release":
		return r.ID + ": released"
	case "delete":
		return r.ID + ": deleted"
	case "flush":
		return fmt.Sprintf("flush: %d %s due now", r.Messages, plural(r.Messages, "message", "messages"))
	}
	return fmt.Sprintf("%s %s: done", r.Action, r.ID)
}

// printQueueList writes a table of msgs, oldest first as the server sends
// them. Times are shown relative to now, this machine's clock, like the
// absolute times in show.
func printQueueList(w io.Writer, msgs []metrics.MessageInfo, now time.Time) {
	if len(msgs) == 0 {
		fmt.Fprintln(w, "queue is empty")
		return
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tAGE\tFROM\tRCPTS\tATTEMPTS\tNEXT\tLAST REPLY\tFLAGS")
	held, inFlight, unreadable := 0, 0, 0
	for _, m := range msgs {
		if m.Error != "" {
			// Only the ID is known; the reason stands in the reply's column.
			unreadable++
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\t-\t%s\tunreadable\n", printable(m.ID), printable(oneLine(m.Error, 60)))
			continue
		}
		if m.Held {
			held++
		}
		if m.InFlight {
			inFlight++
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n",
			printable(m.ID), shortDuration(now.Sub(m.Received)), sender(m.From), rcptSummary(m.Recipients),
			m.Attempts, nextAttempt(m, now), printable(oneLine(m.LastReply, 60)), flags(m))
	}
	tw.Flush()
	total := fmt.Sprintf("%d %s", len(msgs), plural(len(msgs), "message", "messages"))
	var notes []string
	if held > 0 {
		notes = append(notes, fmt.Sprintf("%d held", held))
	}
	if inFlight > 0 {
		notes = append(notes, fmt.Sprintf("%d in flight", inFlight))
	}
	if unreadable > 0 {
		notes = append(notes, fmt.Sprintf("%d unreadable", unreadable))
	}
	if len(notes) > 0 {
		total += " (" + strings.Join(notes, ", ") + ")"
	}
	fmt.Fprintln(w, total)
}

// printQueueMessage writes every field of m and each recipient's state.
func printQueueMessage(w io.Writer, m metrics.MessageInfo, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	row := func(k, v string) { fmt.Fprintf(tw, "%s:\t%s\n", k, v) }
	row("ID", printable(m.ID))
	row("Received", fmt.Sprintf("%s (%s ago)", timestamp(m.Received), shortDuration(now.Sub(m.Received))))
	row("From", sender(m.From))
	if m.User != "" {
		row("User", printable(m.User))
	}
	if m.MessageID != "" {
		row("Message-ID", printable(m.MessageID))
	}
	row("Size", fmt.Sprintf("%d bytes", m.Size))
	row("Attempts", fmt.Sprint(m.Attempts))
	if !m.LastAttempt.IsZero() {
		row("Last attempt", fmt.Sprintf("%s (%s ago)", timestamp(m.LastAttempt), shortDuration(now.Sub(m.LastAttempt))))
	}
	next := timestamp(m.NextAttempt)
	if rel := nextAttempt(m, now); rel != "" {
		next += " (" + rel + ")"
	}
	row("Next attempt", next)
	if m.LastReply != "" {
		row("Last reply", printable(oneLine(m.LastReply, 0)))
	}
	row("Flags", flags(m))
	tw.Flush()

	fmt.Fprintln(w, "Recipients:")
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	for _, r := range m.Recipients {
		if r.Reply == "" {
			fmt.Fprintf(tw, "  %s\t%s\n", printable(r.Addr), printable(r.State))
			continue
		}
		reply := printable(oneLine(r.Reply, 0))
		if r.Upstream != "" {
			reply = "via " + printable(r.Upstream) + ": " + reply
		}
		fmt.Fprintf(tw, "  %s\t%s\t%s\n", printable(r.Addr), printable(r.State), reply)
	}
	tw.Flush()
}

func sender(from string) string {
	if from == "" {
		return "<>"
	}
	return printable(from)
}

// printable is s as it may go to a terminal: unchanged when it is valid
// UTF-8 of printable characters without a backslash, else quoted as a Go
// string ("\x1b[2J", "\u009b", "\u202e", "\xff"), so that a stored
// field cannot clear the screen, move the cursor, set the window title or
// reorder the text after it; and so that an escaped field, which always
// holds a backslash, never looks like a plain one. The API's JSON has
// already turned invalid UTF-8 into U+FFFD, which is shown as \ufffd.
func printable(s string) string {
	if !utf8.ValidString(s) || strings.ContainsAny(s, "\\\ufffd") ||
		strings.ContainsFunc(s, func(r rune) bool { return !strconv.IsPrint(r) }) {
		// strconv.Quote leaves U+FFFD as it is: printable, yet a sign of
		// bytes that were lost.
		return strings.ReplaceAll(strconv.Quote(s), "\ufffd", `\ufffd`)
	}
	return s
}

// rcptSummary shows a few recipients with their states, and counts by
// state for more.
func rcptSummary(rs []metrics.RecipientInfo) string {
	if len(rs) <= 2 {
		parts := make([]string, len(rs))
		for i, r := range rs {
			parts[i] = printable(r.Addr) + ":" + printable(r.State)
		}
		return strings.Join(parts, " ")
	}
	counts := map[string]int{}
	for _, r := range rs {
		counts[r.State]++
	}
	var parts []string
	for _, s := range []string{"pending", "delivered", "failed"} {
		if counts[s] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[s], s))
			delete(counts, s)
		}
	}
	for s, n := range counts { // states this version does not know
		parts = append(parts, fmt.Sprintf("%d %s", n, printable(s)))
	}
	return fmt.Sprintf("%d: %s", len(rs), strings.Join(parts, ", "))
}

// nextAttempt says when the message will be tried again.
func nextAttempt(m metrics.MessageInfo, now time.Time) string {
	switch {
	case m.InFlight:
		return "in flight"
	case m.Held:
		return "held"
	case !m.NextAttempt.After(now):
		return "now"
	}
	return "in " + shortDuration(m.NextAttempt.Sub(now))
}

func flags(m metrics.MessageInfo) string {
	var out []string
	if m.Held {
		out = append(out, "held")
	}
	if m.InFlight {
		out = append(out, "in-flight")
	}
	if m.DSN {
		out = append(out, "dsn")
	}
	if len(out) == 0 {
		return "-"
	}
	return strings.Join(out, ",")
}

// shortDuration shows d in its two largest units, truncated: "42s",
// "4m12s", "2h5m", "3d4h".
func shortDuration(d time.Duration) string {
	d = max(d, 0)
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm%ds", int(d.Minutes()), int(d.Seconds())%60)
	case d < 24*time.Hour:
		return fmt.Sprintf("%dh%dm", int(d.Hours()), int(d.Minutes())%60)
	}
	return fmt.Sprintf("%dd%dh", int(d.Hours())/24, int(d.Hours())%24)
}

func timestamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.Local().Format("2006-01-02 15:04:05 MST")
}

// oneLine folds a multi-line SMTP reply onto one line and, with limit > 0,
// shortens it to limit characters.
func oneLine(s string, limit int) string {
	s = strings.Join(strings.Fields(s), " ")
	if limit > 0 && len([]rune(s)) > limit {
		s = string([]rune(s)[:limit-1]) + "…"
	}
	if s == "" {
		return "-"
	}
	return s
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}
