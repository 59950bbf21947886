package upstream

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/internal/testwait"
	"smarthost/queue"
)

// connTracker is a Deliverer.Dial that counts the connections the
// deliverer has open.
type connTracker struct {
	mu   sync.Mutex
	open int
}

func (ct *connTracker) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	ct.mu.Lock()
	ct.open++
	ct.mu.Unlock()
	return &countedConn{Conn: c, ct: ct}, nil
}

func (ct *connTracker) Open() int {
	ct.mu.Lock()
	defer ct.mu.Unlock()
	return ct.open
}

type countedConn struct {
	net.Conn
	ct   *connTracker
	once sync.Once
}

func (c *countedConn) Close() error {
	c.once.Do(func() {
		c.ct.mu.Lock()
		c.ct.open--
		c.ct.mu.Unlock()
	})
	return c.Conn.Close()
}

func TestPoolReuse(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{})
	up := plainUpstream("a", s)
	up.MaxConnections = 2
	env := newDeliverer(t, up)

	const (
		n       = 200
		workers = 16
	)
	var wg sync.WaitGroup
	results := make([][]queue.Result, n)
	next := make(chan int)
	for range workers {
		wg.Go(func() {
			for i := range next {
				m := testMessage("app@example.com", fmt.Sprintf("r%d@example.net", i))
				results[i] = env.d.Deliver(context.Background(), m, queue.NewBody([]byte(deliverBody)))
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	for i, res := range results {
		if len(res) != 1 || res[0].State != queue.Delivered {
			t.Errorf("message %d: %+v", i, res)
		}
	}
	if got := len(s.WaitMessages(t, n, 10*time.Second)); got != n {
		t.Errorf("%d messages upstream, want %d", got, n)
	}
	if got := s.MaxConcurrent(); got > 2 {
		t.Errorf("upstream saw %d connections at once, want at most 2", got)
	}
	if got := s.Connections(); got > 10 {
		t.Errorf("%d connections for %d messages, want at most 10", got, n)
	}
	st := stateOf(t, env.d, "a")
	if st.Attempts != n || st.Dials != uint64(s.Connections()) || st.OpenConnections > 2 || st.Failures != 0 {
		t.Errorf("state %+v", st)
	}
}

func TestPoolSequentialReuse(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{
		Username: upUser, Password: upPass,
		RcptReply: reply(550, smtp.EnhancedCode{5, 1, 1}, "No such user"),
	})
	up := plainUpstream("a", s)
	up.Username, up.Password = upUser, upPass
	env := newDeliverer(t, up)
	// A refused transaction leaves the session at MAIL: RSET clears it
	// before the next one.
	res := deliver(t, env.d, testMessage("app@example.com", "gone@example.net"), deliverBody)
	checkResult(t, res[0], "gone@example.net", queue.Failed, "550 ", "a")
	s.SetRcptReply(nil)
	for i := range 3 {
		rcpt := fmt.Sprintf("r%d@example.net", i)
		res := deliver(t, env.d, testMessage("other@example.com", rcpt), deliverBody)
		checkResult(t, res[0], rcpt, queue.Delivered, "250 ", "a")
	}
	got := s.WaitMessages(t, 3, 5*time.Second)
	for _, m := range got {
		if m.ConnID != 1 || m.From != "other@example.com" || len(m.To) != 1 || m.AuthUser != upUser {
			t.Errorf("message %+v, want one recipient over connection 1, authenticated", m)
		}
	}
	if s.Connections() != 1 || len(s.AuthAttempts()) != 1 {
		t.Errorf("%d connections and %d AUTH, want 1 of each", s.Connections(), len(s.AuthAttempts()))
	}
}

func TestPoolIdleTimeout(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("a", s))
	ct := &connTracker{}
	env.d.Dial = ct.dial
	env.d.IdleTimeout = 50 * time.Millisecond

	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	testwait.For(t, 5*time.Second, "idle connection still open", func() bool {
		return ct.Open() == 0 && stateOf(t, env.d, "a").OpenConnections == 0
	})
	res = deliver(t, env.d, testMessage("app@example.com", "y@example.net"), deliverBody)
	checkResult(t, res[0], "y@example.net", queue.Delivered, "250 ", "a")
	if got := s.Connections(); got != 2 {
		t.Errorf("%d connections, want a new one after the idle timeout", got)
	}
}

func TestPoolClose(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{})
	up := plainUpstream("a", s)
	up.MaxConnections = 3
	env := newDeliverer(t, up)
	ct := &connTracker{}
	env.d.Dial = ct.dial

	// Three deliveries at once leave three idle connections.
	entered := make(chan struct{}, 3)
	proceed := make(chan struct{})
	s.SetDataReply(func(string, []string, []byte) *smtp.SMTPError {
		entered <- struct{}{}
		<-proceed
		return nil
	})
	var wg sync.WaitGroup
	for i := range 3 {
		wg.Go(func() {
			env.d.Deliver(context.Background(), testMessage("app@example.com", fmt.Sprintf("r%d@example.net", i)), queue.NewBody([]byte(deliverBody)))
		})
	}
	for range 3 {
		<-entered
	}
	close(proceed)
	wg.Wait()
	if st := stateOf(t, env.d, "a"); st.IdleConnections != 3 || ct.Open() != 3 {
		t.Fatalf("before Close: %d open, state %+v", ct.Open(), st)
	}
	env.d.Close()
	if st := stateOf(t, env.d, "a"); st.OpenConnections != 0 || ct.Open() != 0 {
		t.Errorf("after Close: %d open, state %+v", ct.Open(), st)
	}
	// Deliver still works, without keeping the connection.
	s.SetDataReply(nil)
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	if ct.Open() != 0 {
		t.Errorf("%d connections kept after Close", ct.Open())
	}
}

func TestPoolStaleConnection(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("a", s))
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")

	// The upstream restarts: the idle connection is dead.
	s.Close()
	s2 := smtptest.Start(t, smtptest.Options{Addr: s.Addr()})
	res = deliver(t, env.d, testMessage("app@example.com", "y@example.net"), deliverBody)
	checkResult(t, res[0], "y@example.net", queue.Delivered, "250 ", "a")
	if got := s2.WaitMessages(t, 1, 5*time.Second); got[0].To[0] != "y@example.net" {
		t.Errorf("restarted upstream got %+v", got)
	}
	// Not the upstream's failure.
	if st := stateOf(t, env.d, "a"); !st.Up || st.Failures != 0 || st.Dials != 2 || st.OpenConnections != 1 {
		t.Errorf("state %+v", st)
	}
}

func TestPoolBrokenConnectionNotReused(t *testing.T) {
	tests := []struct {
		name string
		opts smtptest.Options
	}{
		{"dropped after data", smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError { return smtptest.Drop }}},
		{"421 to rcpt", smtptest.Options{RcptReply: func(string) *smtp.SMTPError { return busy }}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := smtptest.Start(t, tt.opts)
			env := newDeliverer(t, plainUpstream("a", s))
			ct := &connTracker{}
			env.d.Dial = ct.dial
			res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), deliverBody)
			if res[0].State != queue.Pending {
				t.Fatalf("first delivery: %+v", res)
			}
			if ct.Open() != 0 {
				t.Errorf("broken connection kept open")
			}
			s.SetDataReply(nil)
			s.SetRcptReply(nil)
			res = deliver(t, env.d, testMessage("app@example.com", "y@example.net"), deliverBody)
			checkResult(t, res[0], "y@example.net", queue.Delivered, "250 ", "a")
			if got := s.WaitMessages(t, 1, 5*time.Second); got[0].ConnID != 2 {
				t.Errorf("delivered over connection %d, want a new one", got[0].ConnID)
			}
		})
	}
}

func TestDeliverMaxConnections(t *testing.T) {
	var (
		mu     sync.Mutex
		inData int
		third  = make(chan struct{}) // closed if three deliveries overlap
	)
	s := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
		mu.Lock()
		inData++
		if inData == 3 {
			close(third)
		}
		mu.Unlock()
		// Hold the connection a little so that deliveries overlap; a third
		// one arriving ends the wait at once (and fails the test).
		select {
		case <-third:
		case <-time.After(30 * time.Millisecond):
		}
		mu.Lock()
		inData--
		mu.Unlock()
		return nil
	}})
	up := plainUpstream("a", s)
	up.MaxConnections = 2
	env := newDeliverer(t, up)

	const n = 10
	var wg sync.WaitGroup
	results := make([][]queue.Result, n)
	for i := range n {
		wg.Go(func() {
			m := testMessage("app@example.com", fmt.Sprintf("r%d@example.net", i))
			results[i] = env.d.Deliver(context.Background(), m, queue.NewBody([]byte(deliverBody)))
		})
	}
	wg.Wait()
	for i, res := range results {
		if len(res) != 1 || res[0].State != queue.Delivered {
			t.Errorf("delivery %d: %+v", i, res)
		}
	}
	if got := s.MaxConcurrent(); got > 2 {
		t.Errorf("upstream saw %d connections at once, want at most 2", got)
	}
	// Connections are reused: one per slot at most.
	if got := s.Connections(); got > 2 {
		t.Errorf("%d connections, want at most 2", got)
	}
}

func TestDeliverCancelledWhileWaiting(t *testing.T) {
	entered := make(chan struct{})
	proceed := make(chan struct{})
	s := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
		close(entered)
		<-proceed
		return nil
	}})
	up := plainUpstream("a", s)
	up.MaxConnections = 1
	env := newDeliverer(t, up)

	first := make(chan []queue.Result)
	go func() {
		first <- env.d.Deliver(context.Background(), testMessage("app@example.com", "x@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	<-entered // the only connection slot is taken

	ctx, cancel := context.WithCancel(context.Background())
	second := make(chan []queue.Result)
	go func() {
		second <- env.d.Deliver(ctx, testMessage("app@example.com", "y@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	testwait.For(t, 5*time.Second, "second delivery not waiting for the connection", func() bool {
		p := env.d.current().endpoints["a"].pool
		p.mu.Lock()
		defer p.mu.Unlock()
		return p.freed != nil // a waiter asked to be woken
	})
	cancel()
	res := <-second
	if len(res) != 1 || res[0].State != queue.Pending || !strings.HasPrefix(res[0].Reply, "interrupted: ") {
		t.Errorf("cancelled delivery: %+v", res)
	}
	close(proceed)
	if res := <-first; len(res) != 1 || res[0].State != queue.Delivered {
		t.Errorf("first delivery: %+v", res)
	}
	if s.Connections() != 1 {
		t.Errorf("%d connections, want 1", s.Connections())
	}
}

// TestPoolPlaces drives a pool's places alone: reserved up to its limit,
// then a wait that a freed place or a higher limit ends; a closed pool
// keeps no idle connection.
func TestPoolPlaces(t *testing.T) {
	p := newPool(2, false)
	for i := range 2 {
		if uc, reserved, _ := p.take(); uc != nil || !reserved {
			t.Fatalf("take %d: %v %v, want a place", i, uc, reserved)
		}
	}
	_, reserved, freed := p.take()
	if reserved || freed == nil {
		t.Fatal("a third place at a limit of 2")
	}
	p.free()
	<-freed // woken by the place given back
	if _, reserved, _ := p.take(); !reserved {
		t.Fatal("no place after one was given back")
	}
	_, _, freed = p.take()
	p.setLimit(3)
	<-freed // woken by the higher limit
	if _, reserved, _ := p.take(); !reserved {
		t.Fatal("no place under the higher limit")
	}
	if open, idle := p.size(); open != 3 || idle != 0 {
		t.Errorf("size %d open, %d idle; want 3, 0", open, idle)
	}
	p.close()
	if p.put(&upstreamConn{}, time.Minute) {
		t.Error("a closed pool kept an idle connection")
	}
}
