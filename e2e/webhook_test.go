package e2e

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
	"smarthost/internal/testwait"
)

// webhookConfig is a [[webhook]] table posting events to url, with a new
// key in a secret file; it returns the table and the key.
func webhookConfig(t *testing.T, name, url string, events ...string) (string, []byte) {
	t.Helper()
	key := make([]byte, 32)
	rand.Read(key)
	return webhookTable(t, name, url, key, events...), key
}

// webhookTable is a [[webhook]] table posting events to url, signed with
// key, which it writes into a secret file.
func webhookTable(t *testing.T, name, url string, key []byte, events ...string) string {
	t.Helper()
	file := filepath.Join(t.TempDir(), name+".secret")
	if err := os.WriteFile(file, []byte("whsec_"+base64.StdEncoding.EncodeToString(key)+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	table := fmt.Sprintf("\n[[webhook]]\nname = %q\nurl = %q\nsecret_file = %q\n", name, url, file)
	if len(events) > 0 { // else the default: bounced, expired
		quoted := make([]string, len(events))
		for i, e := range events {
			quoted[i] = strconv.Quote(e)
		}
		table += "events = [" + strings.Join(quoted, ", ") + "]\n"
	}
	return table
}

// hookPost is one post a receiver took: its headers and body.
type hookPost struct {
	ID   string
	Type string `json:"type"`
	Data struct {
		QueueID  string `json:"queue_id"`
		Rcpt     string `json:"rcpt"`
		Upstream string `json:"upstream"`
		Reply    string `json:"reply"`
		Status   string `json:"status"`
		Attempt  int    `json:"attempt"`
	} `json:"data"`
}

// receiver is a webhook endpoint on loopback that checks every post's
// Standard Webhooks signature with its own code, and answers 500 to the
// first fail tries of each webhook-id.
type receiver struct {
	t    *testing.T
	key  []byte
	fail int
	srv  *http.Server
	url  string

	mu      sync.Mutex
	tries   map[string]int // by webhook-id
	taken   []hookPost     // answered 2xx, in order
	badSigs int
}

func startReceiver(t *testing.T, addr string, key []byte, fail int) *receiver {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	r := &receiver{t: t, key: key, fail: fail, tries: map[string]int{}, url: "http://" + ln.Addr().String() + "/hook"}
	r.srv = &http.Server{Handler: r}
	go r.srv.Serve(ln)
	t.Cleanup(func() { r.srv.Close() })
	return r
}

func (r *receiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, _ := io.ReadAll(req.Body)
	id, ts := req.Header.Get("webhook-id"), req.Header.Get("webhook-timestamp")
	mac := hmac.New(sha256.New, r.key)
	mac.Write([]byte(id + "." + ts + "."))
	mac.Write(body)
	want := "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil))
	r.mu.Lock()
	defer r.mu.Unlock()
	if req.Header.Get("webhook-signature") != want || req.Header.Get("Content-Type") != "application/json" {
		r.badSigs++
		http.Error(w, "bad signature", http.StatusUnauthorized)
		return
	}
	r.tries[id]++
	if r.tries[id] <= r.fail {
		http.Error(w, "try again", http.StatusInternalServerError)
		return
	}
	var p hookPost
	if err := json.Unmarshal(body, &p); err != nil {
		r.t.Errorf("post %s: %v: %s", id, err, body)
	}
	p.ID = id
	r.taken = append(r.taken, p)
}

func (r *receiver) posts() []hookPost {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]hookPost(nil), r.taken...)
}

// TestWebhooks: a receiver that answers 500 to the first two tries of
// each post gets every event of a message with three recipients (one
// refused, one deferred once), each signed as Standard Webhooks says and
// with the same webhook-id on every try.
func TestWebhooks(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startMixedUpstream(t, pki)
	key := make([]byte, 32)
	rand.Read(key)
	rcv := startReceiver(t, "", key, 2)
	hook := webhookTable(t, "billing", rcv.url, key, "delivered", "deferred", "bounced")
	r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), Extra: hook}))
	s := connect(t, r.addr, pki)
	defer s.close()
	id, err := s.send("app@example.com", []string{"bob@example.net", "gone@example.net", "later@example.net"}, testMsg)
	if err != nil {
		t.Fatal(err)
	}
	testwait.For(t, 60*time.Second, "four posts taken", func() bool { return len(rcv.posts()) >= 4 })
	time.Sleep(500 * time.Millisecond) // any post beyond the four would come now
	got := map[string]hookPost{}
	for _, p := range rcv.posts() {
		if p.Data.QueueID != id {
			t.Errorf("post about another message: %+v", p)
		}
		got[p.Type+" "+p.Data.Rcpt+" "+strconv.Itoa(p.Data.Attempt)] = p
	}
	for k, reply := range map[string]string{
		"message.delivered bob@example.net 1":   "250 ",
		"message.bounced gone@example.net 1":    "550 5.1.1 No such user gone",
		"message.deferred later@example.net 1":  "451 4.2.0 Mailbox busy",
		"message.delivered later@example.net 2": "250 ",
	} {
		p, ok := got[k]
		if !ok || !strings.HasPrefix(p.Data.Reply, reply) || p.Data.Upstream != "up" || "message."+p.Data.Status != p.Type {
			t.Errorf("%s: %+v (taken: %v)", k, p, rcv.posts())
		}
	}
	rcv.mu.Lock()
	defer rcv.mu.Unlock()
	if len(rcv.taken) != 4 || rcv.badSigs != 0 {
		t.Errorf("%d posts taken, %d with a bad signature; want 4 and 0", len(rcv.taken), rcv.badSigs)
	}
	for id, n := range rcv.tries {
		if n != 3 {
			t.Errorf("webhook-id %s tried %d times, want 3 (two 500s, then 200)", id, n)
		}
	}
}

// TestWebhookDeadEndpoint: an endpoint that takes connections and never
// answers does not slow the delivery of mail: 30 messages are delivered
// about as fast as by a relay with no webhook.
func TestWebhookDeadEndpoint(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var held []net.Conn
	var heldMu sync.Mutex
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			heldMu.Lock()
			held = append(held, c) // never answered
			heldMu.Unlock()
		}
	}()
	t.Cleanup(func() {
		heldMu.Lock()
		defer heldMu.Unlock()
		for _, c := range held {
			c.Close()
		}
	})
	hook, _ := webhookConfig(t, "dead", "http://"+ln.Addr().String()+"/hook", "accepted", "delivered")
	const n = 30
	deliver := func(extra string) time.Duration {
		up := startUpstream(t, pki, smtptest.Options{})
		r := startRelay(t, writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), Extra: extra}))
		s := connect(t, r.addr, pki)
		defer s.close()
		start := time.Now()
		for range n {
			if _, err := s.send("app@example.com", []string{"bob@example.net"}, testMsg); err != nil {
				t.Fatal(err)
			}
		}
		up.WaitMessages(t, n, 60*time.Second)
		return time.Since(start)
	}
	without := deliver("")
	with := deliver(hook)
	t.Logf("%d messages delivered in %s with no webhook, in %s with a webhook that never answers", n, without.Round(time.Millisecond), with.Round(time.Millisecond))
	if with > 2*without+2*time.Second {
		t.Errorf("a dead webhook slowed delivery: %s against %s", with, without)
	}
}

// TestWebhookSurvivesKill: the post of an outcome is stored with the
// outcome; a relay killed before it could post it posts it once started
// again, and nothing else.
func TestWebhookSurvivesKill(t *testing.T) {
	t.Parallel()
	pki := testpki.New(t)
	up := startUpstream(t, pki, smtptest.Options{})
	hookAddr, freeHook := reserveAddr(t)
	hook, key := webhookConfig(t, "billing", "http://"+hookAddr+"/hook", "delivered")
	cfg := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), Extra: hook})
	r := startRelay(t, cfg)
	s := connect(t, r.addr, pki)
	id, err := s.send("app@example.com", []string{"bob@example.net", "carol@example.net"}, testMsg)
	if err != nil {
		t.Fatal(err)
	}
	s.close()
	r.waitLog("delivered", map[string]string{"queue_id": id, "rcpt": "carol@example.net"}, 20*time.Second)
	r.kill() // the endpoint was down: both posts wait in the queue

	freeHook()
	rcv := startReceiver(t, hookAddr, key, 0)
	startRelay(t, cfg)
	testwait.For(t, 30*time.Second, "the posts after the restart", func() bool { return len(rcv.posts()) >= 2 })
	time.Sleep(1500 * time.Millisecond) // a post beyond the two would come now
	posts := rcv.posts()
	rcpts := map[string]bool{}
	for _, p := range posts {
		if p.Data.QueueID != id || p.Type != "message.delivered" {
			t.Errorf("post %+v", p)
		}
		rcpts[p.Data.Rcpt] = true
	}
	if len(posts) != 2 || !rcpts["bob@example.net"] || !rcpts["carol@example.net"] {
		t.Errorf("posts after the restart: %+v; want one per recipient", posts)
	}
}
