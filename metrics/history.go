package metrics

import (
	"errors"
	"net/http"
	"strconv"
	"time"

	"smarthost/queue"
)

// MessageHistory is a message as GET /api/messages finds it, queued or
// gone: its history, with State "queued" while it is in the queue and
// then how it left (delivered, bounced, deleted).
type MessageHistory struct {
	queue.History
	State string `json:"state"`
}

func newMessageHistory(h queue.History) MessageHistory {
	state := "queued"
	if !h.Left.IsZero() {
		state = string(h.Outcome)
	}
	if h.Recipients == nil {
		h.Recipients = []string{}
	}
	return MessageHistory{History: h, State: state}
}

// historyParams are the query parameters of GET /api/messages.
var historyParams = map[string]bool{"to": true, "from": true, "user": true, "msg_id": true, "since": true, "until": true, "limit": true}

// messages is GET /api/messages: the messages that the parameters select,
// newest first.
func (a *API) messages(w http.ResponseWriter, r *http.Request) {
	f, err := historyFilter(r)
	if err != nil {
		writeError(w, http.StatusBadRequest, err.Error())
		return
	}
	found, err := a.Queue.FindHistory(f)
	if err != nil {
		a.fail(w, r, err)
		return
	}
	out := make([]MessageHistory, len(found))
	for i, h := range found {
		out[i] = newMessageHistory(h)
	}
	writeJSON(w, http.StatusOK, out)
}

// historyFilter reads the parameters of GET /api/messages. A parameter
// that is unknown, repeated or unreadable is refused, so that a typo
// does not widen the answer.
func historyFilter(r *http.Request) (queue.HistoryFilter, error) {
	var f queue.HistoryFilter
	q := r.URL.Query()
	for k, vs := range q {
		if !historyParams[k] {
			return f, errors.New("unknown parameter " + strconv.Quote(k) + "; use to, from, user, msg_id, since, until or limit")
		}
		if len(vs) != 1 || vs[0] == "" {
			return f, errors.New("parameter " + k + " needs one value")
		}
	}
	f.To, f.From, f.User, f.MessageID = q.Get("to"), q.Get("from"), q.Get("user"), q.Get("msg_id")
	for k, t := range map[string]*time.Time{"since": &f.Since, "until": &f.Until} {
		if v := q.Get(k); v != "" {
			at, err := time.Parse(time.RFC3339Nano, v)
			if err != nil {
				return f, errors.New(k + ": want an RFC 3339 time such as 2026-12-05T10:00:00Z")
			}
			*t = at
		}
	}
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 || n > queue.MaxHistoryResults {
			return f, errors.New("limit: want a number from 1 to " + strconv.Itoa(queue.MaxHistoryResults))
		}
		f.Limit = n
	}
	return f, nil
}

// message is GET /api/messages/{id}: one message with its events.
func (a *API) message(w http.ResponseWriter, r *http.Request) {
	h, err := a.Queue.History(r.PathValue("id"))
	if errors.Is(err, queue.ErrNotFound) {
		writeError(w, http.StatusNotFound, "no message "+r.PathValue("id")+" in the queue or its history")
		return
	}
	if err != nil {
		a.fail(w, r, err)
		return
	}
	writeJSON(w, http.StatusOK, newMessageHistory(*h))
}
