package e2e

import (
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testpki"
)

// crashTarget is the relay the load clients talk to: its address and a
// generation that grows on each restart, so that a client whose session
// broke waits for the next relay instead of spinning on a dead one.
type crashTarget struct {
	mu      sync.Mutex
	changed *sync.Cond
	addr    string
	gen     int
	stopped bool
}

func newCrashTarget() *crashTarget {
	ct := &crashTarget{}
	ct.changed = sync.NewCond(&ct.mu)
	return ct
}

// set publishes a new relay address ("" while none is serving).
func (ct *crashTarget) set(addr string) {
	ct.mu.Lock()
	ct.addr = addr
	ct.gen++
	ct.mu.Unlock()
	ct.changed.Broadcast()
}

func (ct *crashTarget) stop() {
	ct.mu.Lock()
	ct.stopped = true
	ct.mu.Unlock()
	ct.changed.Broadcast()
}

// next waits for a serving relay of a generation after gen and returns it;
// ok is false once the load is stopped.
func (ct *crashTarget) next(gen int) (addr string, newGen int, ok bool) {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	for !ct.stopped && (ct.gen <= gen || ct.addr == "") {
		ct.changed.Wait()
	}
	return ct.addr, ct.gen, !ct.stopped
}

func (ct *crashTarget) isStopped() bool {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	return ct.stopped
}

// dialSubmitter is connect without t.Fatal: under the crash loop the relay
// may die between dial and AUTH.
func dialSubmitter(addr string, pki *testpki.PKI) (*submitter, error) {
	c, err := smtp.DialStartTLS(addr, pki.ClientTLS())
	if err != nil {
		return nil, err
	}
	// A SIGKILLed peer closes its sockets, so these only guard against a hang.
	c.CommandTimeout = 10 * time.Second
	c.SubmissionTimeout = 10 * time.Second
	if err := c.Auth(sasl.NewPlainClient("", userName, userPassword)); err != nil {
		c.Close()
		return nil, err
	}
	return &submitter{c: c}, nil
}

// seedEnv names the environment variable that replays a crash loop's
// kill moments: TestCrashLoop logs the seed it drew.
const seedEnv = "SMARTHOST_CRASHLOOP_SEED"

// crashLoopSeed is the seed in seedEnv, or a new one; either is logged
// with the command line that replays it. A replay repeats when each kill
// comes, not how the goroutines and the kernel schedule around it.
func crashLoopSeed(t *testing.T) uint64 {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if v := os.Getenv(seedEnv); v != "" {
		var err error
		if seed, err = strconv.ParseUint(v, 10, 64); err != nil {
			t.Fatalf("%s=%q: %v", seedEnv, v, err)
		}
	}
	t.Logf("kill moments from seed %d; replay with %s=%d go test -run '^%s$' ./e2e/", seed, seedEnv, seed, t.Name())
	return seed
}

// TestCrashLoop submits mail from several clients without pause while the
// relay is SIGKILLed at random moments and restarted on the same queue,
// with the upstream up so that kills land during DATA, during the queue's
// fsync and during delivery. Every message that got a 250 must be
// delivered at least once; duplicates are allowed (at-least-once) and
// reported. It runs alone, not in parallel: the kills are to land in the
// work of a relay under this load, not one starved by other tests.
func TestCrashLoop(t *testing.T) {
	const (
		clients = 4
		kills   = 21
	)
	rng := rand.New(rand.NewPCG(crashLoopSeed(t), 6))
	pki := testpki.New(t)
	up := smtptest.Start(t, smtptest.Options{TLS: smtptest.TLSImplicit, TLSConfig: pki.ServerTLS(), Username: upUser, Password: upPassword})
	cfg := writeConfig(t, relayConfig{PKI: pki, UpstreamAddr: up.Addr(), RetryMin: "500ms", RetryMax: "1s"})

	target := newCrashTarget()
	var mu sync.Mutex
	accepted := map[string]bool{}
	sendErrors := 0
	var wg sync.WaitGroup
	for c := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			gen := 0
			for i := 0; ; {
				addr, g, ok := target.next(gen)
				if !ok {
					return
				}
				gen = g
				s, err := dialSubmitter(addr, pki)
				if err != nil {
					continue // this relay died: wait for the next one
				}
				for !target.isStopped() {
					msg := fmt.Sprintf("From: app@example.com\r\nTo: bob@example.net\r\nSubject: crash loop %d/%d\r\n\r\nbody %d/%d\r\n", c, i, c, i)
					i++
					id, err := s.send("app@example.com", []string{"bob@example.net"}, msg)
					if err != nil {
						mu.Lock()
						sendErrors++
						mu.Unlock()
						break
					}
					mu.Lock()
					accepted[id] = true
					mu.Unlock()
				}
				s.c.Close()
			}
		}()
	}
	stopLoad := func() {
		target.stop()
		wg.Wait()
	}
	defer stopLoad()

	for range kills {
		r := startRelay(t, cfg)
		target.set(r.addr)
		time.Sleep(time.Duration(50+rng.IntN(351)) * time.Millisecond) // the kill moment itself
		r.kill()
		target.set("")
	}

	// The last relay runs without load until everything accepted is out.
	stopLoad()
	startRelay(t, cfg)
	mu.Lock()
	defer mu.Unlock()
	if len(accepted) < kills {
		t.Fatalf("only %d messages accepted over %d kills: the load did not run", len(accepted), kills)
	}
	deadline := time.Now().Add(60 * time.Second)
	var delivered map[string]int
	var lost []string
	for {
		delivered = map[string]int{}
		for _, m := range up.Messages() {
			delivered[queueIDOf(m.Data)]++
		}
		lost = lost[:0]
		for id := range accepted {
			if delivered[id] == 0 {
				lost = append(lost, id)
			}
		}
		if len(lost) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}

	dups, dupIDs := 0, 0
	var unseen []string // delivered, but the kill came before the 250 reached the client
	for id, n := range delivered {
		if id == "" {
			t.Errorf("%d delivered messages carry no queue ID in Received:", n)
			continue
		}
		if n > 1 {
			dups += n - 1
			dupIDs++
		}
		if !accepted[id] {
			unseen = append(unseen, id)
		}
	}
	sort.Strings(unseen)
	t.Logf("kills %d, messages accepted %d, lost %d, send errors %d", kills, len(accepted), len(lost), sendErrors)
	t.Logf("duplicates %d extra deliveries of %d messages (rate %.2f%% of accepted)", dups, dupIDs, 100*float64(dups)/float64(len(accepted)))
	t.Logf("delivered without a 250 seen: %d %v", len(unseen), unseen)
	if len(lost) > 0 {
		sort.Strings(lost)
		t.Fatalf("%d of %d accepted messages never delivered within 60s: %v", len(lost), len(accepted), lost)
	}
}
