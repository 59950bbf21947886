package metrics

import (
	"bytes"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"smarthost/queue"
	"smarthost/relay/upstream"
)

// QueueAdmin is what the admin API does to the queue; every
// queue.Backend implements it.
type QueueAdmin interface {
	// List returns every queued message, oldest first, and those whose
	// records cannot be read.
	List() ([]queue.Entry, []queue.Unreadable, error)
	// Get returns one message or an error wrapping queue.ErrNotFound.
	Get(id string) (*queue.Entry, error)
	// Retry makes a message due now; queue.ErrHeld for a held one.
	Retry(id string) error
	// Hold keeps a message out of delivery until Release.
	Hold(id string) error
	// Release lets a held message be delivered again.
	Release(id string) error
	// Delete removes a message without a bounce.
	Delete(id string) error
	// Flush makes every message that is not held due now and returns how
	// many it touched.
	Flush() (int, error)
	// History returns a message's history, queued or gone; FindHistory
	// the histories a filter selects (queue.Backend).
	History(id string) (*queue.History, error)
	FindHistory(f queue.HistoryFilter) ([]queue.History, error)
	// Content opens a queued message's content, as its delivery sends
	// it; an error wrapping queue.ErrNotFound if it is not queued.
	Content(id string) (queue.Body, func(), error)
}

// API is the queue administration API under /api/:
//
//	GET    /api/queue               every queued message ([]MessageInfo), unreadable ones with Error
//	GET    /api/queue/{id}          one message (MessageInfo)
//	GET    /api/queue/{id}/content  its content as it will be sent (message/rfc822); ?headers=1 its header section only
//	POST   /api/queue/{id}/retry    make it due now (ActionResult)
//	POST   /api/queue/{id}/hold     keep it out of delivery
//	POST   /api/queue/{id}/release  let it be delivered again
//	DELETE /api/queue/{id}          remove it, without a bounce
//	POST   /api/queue/flush         make every message that is not held due now
//	POST   /api/queue/{action}      hold, release, retry or delete every message that
//	                                ?from=, ?to=, ?user= (all that are given must match) or
//	                                ?all=1 select; ?dry_run=1 changes nothing (ActionResult)
//	GET    /api/messages            messages queued or gone, newest first ([]MessageHistory); ?to=&from=&user=&msg_id=&since=&until=&limit=
//	GET    /api/messages/{id}       one, with its events (MessageHistory)
//	GET    /api/upstreams           the upstreams' states
//
// With Token set every request must carry "Authorization: Bearer Token".
// Without it only loopback clients are answered, and only requests whose
// Host is a loopback address or localhost and that carry neither Origin
// nor "Sec-Fetch-Site: cross-site", so that a web page in a browser on
// the same machine can neither read nor change the queue. Errors are
// APIError bodies with the fitting status.
type API struct {
	Queue QueueAdmin
	// Upstreams reports the upstreams' states; nil reports none.
	Upstreams func() []upstream.State
	// Token is the bearer token; "" restricts the API to loopback
	// clients that are not web pages.
	Token string
	// Now is the clock for message ages. Default time.Now.
	Now func() time.Time
	// Logger receives one line per change an administrator makes.
	// Default slog.Default().
	Logger *slog.Logger

	once    sync.Once
	handler http.Handler
}

// MessageInfo is a queued message as the API shows it.
type MessageInfo struct {
	ID          string          `json:"id"`
	Received    time.Time       `json:"received"`
	Age         int64           `json:"age"`  // whole seconds since Received
	From        string          `json:"from"` // "" is the null sender <>
	User        string          `json:"user,omitempty"`
	MessageID   string          `json:"msg_id,omitempty"`
	Size        int64           `json:"size"` // bytes
	Recipients  []RecipientInfo `json:"recipients"`
	Attempts    int             `json:"attempts"`
	LastAttempt time.Time       `json:"last_attempt,omitzero"`
	NextAttempt time.Time       `json:"next_attempt"`
	LastReply   string          `json:"last_reply,omitempty"`
	Held        bool            `json:"held"`
	InFlight    bool            `json:"in_flight"` // an attempt is in progress
	DSN         bool            `json:"dsn"`       // a bounce or delay warning
	// Error is set, in a list, for a message whose stored record cannot
	// be read: only ID and Error mean anything then. Deleting the ID
	// removes it.
	Error string `json:"error,omitempty"`
}

// RecipientInfo is one recipient of a MessageInfo.
type RecipientInfo struct {
	Addr     string `json:"addr"`
	State    string `json:"state"`           // "pending", "delivered" or "failed"
	Reply    string `json:"reply,omitempty"` // the last upstream reply for it
	Upstream string `json:"upstream,omitempty"`
}

// ActionResult answers a change: the action, the message it was applied
// to (none for flush and bulk actions) and how many messages it touched.
type ActionResult struct {
	Action   string `json:"action"` // "retry", "hold", "release", "delete" or "flush"
	ID       string `json:"id,omitempty"`
	Messages int    `json:"messages"`
	// IDs, for a bulk action, are the messages it was applied to, or with
	// DryRun those it would be applied to; empty, not absent, for none.
	IDs    []string `json:"ids,omitzero"`
	DryRun bool     `json:"dry_run,omitempty"`
	// Skipped counts the matching messages a bulk action left as they
	// are, and SkippedBecause breaks them down by why: "held" (retry),
	// "in flight" (retry: the attempt in progress is its retry), "already
	// held" (hold), "not held" (release), "gone" (delivered or deleted
	// meanwhile), "unreadable" (all=1; delete those by ID).
	Skipped        int            `json:"skipped,omitempty"`
	SkippedBecause map[string]int `json:"skipped_because,omitempty"`
}

// APIError is the body of every error answer.
type APIError struct {
	Error string `json:"error"`
}

// NewMessageInfo describes m as the API shows it, aged against now.
func NewMessageInfo(m queue.Entry, now time.Time) MessageInfo {
	info := MessageInfo{
		ID:          m.ID,
		Received:    m.Received,
		Age:         int64(max(now.Sub(m.Received), 0) / time.Second),
		From:        m.From,
		User:        m.User,
		MessageID:   m.MessageID,
		Size:        m.Size,
		Recipients:  make([]RecipientInfo, len(m.Recipients)),
		Attempts:    m.Attempts,
		LastAttempt: m.LastAttempt,
		NextAttempt: m.NextAttempt,
		LastReply:   m.LastReply,
		Held:        m.Held,
		InFlight:    m.InFlight,
		DSN:         m.DSN,
	}
	for i, r := range m.Recipients {
		info.Recipients[i] = RecipientInfo{Addr: r.Addr, State: r.State.String(), Reply: r.Reply, Upstream: r.Upstream}
	}
	return info
}

// maxRequestBody bounds the body of an API request. No endpoint takes
// one today; the bound keeps it so for whatever reads one later.
const maxRequestBody = 64 << 10

// ServeHTTP checks the client's access and the request's size, then
// routes the request.
func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	a.once.Do(a.init)
	if !a.authorized(w, r) {
		return
	}
	if r.ContentLength > maxRequestBody {
		writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("request body over %d bytes", maxRequestBody))
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxRequestBody)
	a.handler.ServeHTTP(w, r)
}

func (a *API) init() {
	if a.Now == nil {
		a.Now = time.Now
	}
	if a.Logger == nil {
		a.Logger = slog.Default()
	}
	// Routes are registered by path, with the methods checked here, so
	// that a wrong method gets a JSON 405 like every other API error.
	mux := http.NewServeMux()
	mux.HandleFunc("/api/queue", methods{http.MethodGet: a.list}.serve)
	mux.HandleFunc("/api/queue/flush", methods{http.MethodPost: a.flush}.serve)
	mux.HandleFunc("/api/queue/{id}", methods{http.MethodGet: a.show, http.MethodDelete: a.change("delete", a.Queue.Delete)}.serve)
	for action, op := range map[string]func(id string) error{
		"retry":   a.Queue.Retry,
		"hold":    a.Queue.Hold,
		"release": a.Queue.Release,
	} {
		mux.HandleFunc("/api/queue/{id}/"+action, methods{http.MethodPost: a.change(action, op)}.serve)
	}
	// Queue IDs are hex digits, never these words, which the mux prefers
	// to {id} as more specific.
	for action, op := range map[string]func(id string) error{
		"retry":   a.Queue.Retry,
		"hold":    a.Queue.Hold,
		"release": a.Queue.Release,
		"delete":  a.Queue.Delete,
	} {
		mux.HandleFunc("/api/queue/"+action, methods{http.MethodPost: a.bulk(action, op)}.serve)
	}
	mux.HandleFunc("/api/queue/{id}/content", methods{http.MethodGet: a.content}.serve)
	mux.HandleFunc("/api/messages", methods{http.MethodGet: a.messages}.serve)
	mux.HandleFunc("/api/messages/{id}", methods{http.MethodGet: a.message}.serve)
	mux.HandleFunc("/api/upstreams", methods{http.MethodGet: a.upstreams}.serve)
	mux.HandleFunc("/api/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "no such API endpoint: "+r.URL.Path)
	})
	a.handler = mux
}

// methods maps the methods a route accepts to their handlers.
type methods map[string]http.HandlerFunc

func (ms methods) serve(w http.ResponseWriter, r *http.Request) {
	if h, ok := ms[r.Method]; ok {
		h(w, r)
		return
	}
	allowed := make([]string, 0, len(ms))
	for m := range ms {
		allowed = append(allowed, m)
	}
	slices.Sort(allowed)
	w.Header().Set("Allow", strings.Join(allowed, ", "))
	writeError(w, http.StatusMethodNotAllowed, "method "+r.Method+" not allowed; use "+strings.Join(allowed, " or "))
}

// authorized answers 401 or 403 and returns false unless the client may
// use the API.
func (a *API) authorized(w http.ResponseWriter, r *http.Request) bool {
	if a.Token == "" {
		// Without a token the API is as safe as the machine's own users:
		// nobody else can reach it.
		if !fromLoopback(r) {
			writeError(w, http.StatusForbidden, "the admin API answers only loopback clients when no admin token is set ([http] admin_token_env)")
			return false
		}
		// A browser on this machine is a loopback client too, driven by
		// any page it shows. A name of the attacker's that resolves to
		// 127.0.0.1 (DNS rebinding) arrives with that name as Host; a
		// page's own request, cross-origin (CSRF) or not, carries Origin
		// (RFC 6454 section 7) or Sec-Fetch-Site (Fetch Metadata). Tools
		// such as smarthost queue send neither.
		if !loopbackHost(r.Host) {
			writeError(w, http.StatusForbidden, "the admin API answers only requests to a loopback address or localhost when no admin token is set ([http] admin_token_env)")
			return false
		}
		if r.Header.Get("Origin") != "" || strings.EqualFold(r.Header.Get("Sec-Fetch-Site"), "cross-site") {
			writeError(w, http.StatusForbidden, "the admin API answers no request from a web page when no admin token is set ([http] admin_token_env)")
			return false
		}
		return true
	}
	// RFC 6750 section 2.1: "Authorization: Bearer <token>"; the scheme
	// name is case-insensitive (RFC 9110 section 11.1).
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if !strings.EqualFold(scheme, "Bearer") || token == "" {
		w.Header().Set("WWW-Authenticate", `Bearer realm="smarthost"`)
		writeError(w, http.StatusUnauthorized, "a bearer token is required")
		return false
	}
	// Hashing first makes the comparison constant-time in the length too.
	got, want := sha256.Sum256([]byte(strings.TrimSpace(token))), sha256.Sum256([]byte(a.Token))
	if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
		// RFC 6750 section 3.1.
		w.Header().Set("WWW-Authenticate", `Bearer realm="smarthost", error="invalid_token"`)
		writeError(w, http.StatusUnauthorized, "invalid token")
		return false
	}
	return true
}

func fromLoopback(r *http.Request) bool {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	return err == nil && ap.Addr().Unmap().IsLoopback()
}

// loopbackHost reports whether a request's Host names this machine: a
// loopback address or localhost, with any port.
func loopbackHost(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	} else if strings.HasPrefix(host, "[") && strings.HasSuffix(host, "]") {
		host = host[1 : len(host)-1] // "[::1]" without a port
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	addr, err := netip.ParseAddr(host)
	return err == nil && addr.Zone() == "" && addr.Unmap().IsLoopback()
}

// list answers every message, the unreadable ones after the others, so
// that one bad record neither hides the rest nor hides itself.
func (a *API) list(w http.ResponseWriter, r *http.Request) {
	msgs, bad, err := a.Queue.List()
	if err != nil {
		a.fail(w, r, err)
		return
	}
	now := a.Now()
	out := make([]MessageInfo, 0, len(msgs)+len(bad))
	for _, m := range msgs {
		out = append(out, NewMessageInfo(m, now))
	}
	for _, u := range bad {
		out = append(out, MessageInfo{ID: u.ID, Recipients: []RecipientInfo{}, Error: u.Reason})
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) show(w http.ResponseWriter, r *http.Request) {
	m, err := a.Queue.Get(r.PathValue("id"))
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, NewMessageInfo(*m, a.Now()))
}

// content streams a message's stored content, or with ?headers=1 its
// header section, up to and including the empty line that ends it.
func (a *API) content(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	body, closeBody, err := a.Queue.Content(id)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	defer closeBody()
	var src io.Reader = body.Reader()
	if r.URL.Query().Get("headers") == "1" {
		src = bytes.NewReader(headerSection(body.Head()))
	}
	w.Header().Set("Content-Type", "message/rfc822")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	if _, err := io.Copy(w, src); err != nil {
		// The status is sent: the client sees a short body.
		a.Logger.Warn("queue: sending a message's content failed", "queue_id", id, "err", err)
	}
}

// headerSection returns head up to and including the empty line that ends
// the header section, or all of head if it has none. The head of a stored
// message holds at least its header section.
func headerSection(head []byte) []byte {
	if bytes.HasPrefix(head, []byte("\r\n")) {
		return head[:2]
	}
	if i := bytes.Index(head, []byte("\r\n\r\n")); i >= 0 {
		return head[:i+4]
	}
	return head
}

// change returns the handler that applies op to the message {id}.
func (a *API) change(action string, op func(id string) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if err := op(id); err != nil {
			a.fail(w, r, err)
			return
		}
		a.Logger.Info("queue: "+action+" by administrator", "queue_id", id, "client", r.RemoteAddr)
		writeJSON(w, http.StatusOK, ActionResult{Action: action, ID: id, Messages: 1})
	}
}

func (a *API) flush(w http.ResponseWriter, r *http.Request) {
	n, err := a.Queue.Flush()
	if err != nil {
		a.fail(w, r, err)
		return
	}
	a.Logger.Info("queue: flush by administrator", "messages", n, "client", r.RemoteAddr)
	writeJSON(w, http.StatusOK, ActionResult{Action: "flush", Messages: n})
}

func (a *API) upstreams(w http.ResponseWriter, r *http.Request) {
	states := []upstream.State{}
	if a.Upstreams != nil {
		if s := a.Upstreams(); s != nil {
			states = s
		}
	}
	writeJSON(w, http.StatusOK, states)
}

// fail answers a queue error: 404 for an unknown message, 409 for a
// change that the message's state forbids, 500 for the rest.
func (a *API) fail(w http.ResponseWriter, r *http.Request, err error) {
	switch {
	case errors.Is(err, queue.ErrNotFound):
		writeError(w, http.StatusNotFound, "no queued message "+r.PathValue("id"))
	case errors.Is(err, queue.ErrHeld):
		writeError(w, http.StatusConflict, "message "+r.PathValue("id")+" is held; release it first")
	default:
		a.Logger.Error("admin API: queue operation failed", "method", r.Method, "path", r.URL.Path, "err", err)
		writeError(w, http.StatusInternalServerError, err.Error())
	}
}

func writeError(w http.ResponseWriter, code int, msg string) {
	writeJSON(w, code, APIError{Error: msg})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
