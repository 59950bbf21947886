package main

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
)

// The memory goals of issue 7's acceptance: resident memory of an idle
// relay holding queuedMessages, and its growth while bigClients each send
// one bigMessage at once.
const (
	queuedMessages = 1000
	queuedSize     = 10 << 10
	bigClients     = 20
	bigMessage     = 25 << 20
)

// The memory bounds of the hardening issue: peak RSS while manySessions
// each send one manySize message at once, and while a backlog of
// backlogMessages of backlogSize is delivered to a sink by the default 16
// workers, each under memoryBound.
const (
	manySessions    = 1000
	manySize        = 900 << 10
	backlogMessages = 200
	backlogSize     = 25 << 20
	memoryBound     = 256 << 20
)

// memoryLimits let bigMessage through.
const memoryLimits = `max_message_size = "30MB"
`

// Memory measures smarthost alone, with an upstream that refuses every
// connection, so that what it accepts stays queued: RSS idle with
// queuedMessages queued, the time to restart on that queue, and the RSS
// growth while bigClients send bigMessage each, with and without SIZE
// declared. Then, with an upstream that takes everything, the peaks under
// load (manyAtOnce, backlog), for the baseline binary too if there is one.
// It returns a Markdown report.
func (b *Bench) Memory(ctx context.Context) (string, error) {
	work, err := os.MkdirTemp(b.opts.WorkDir, "smarthost-memory-")
	if err != nil {
		return "", err
	}
	if !b.opts.Keep {
		defer os.RemoveAll(work)
	}
	down, err := freeAddr() // nothing listens there
	if err != nil {
		return "", err
	}
	b.extraLimits = memoryLimits
	var r strings.Builder
	fmt.Fprintf(&r, "# smarthost memory\n\nMade by `bench/run -memory` on %s.\n\n", time.Now().UTC().Format("2006-01-02 15:04 MST"))
	fmt.Fprintf(&r, "Resident memory (VmRSS, VmHWM from /proc/PID/status) of `smarthost serve` with a trusted-network listener and an upstream that refuses connections, so that every accepted message stays queued (each is claimed once and deferred).\n\n")
	fmt.Fprintf(&r, "| measurement | value |\n| --- | ---: |\n")

	dir := filepath.Join(work, "queued")
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", err
	}
	inst, err := b.startSmarthost(ctx, dir, down, false)
	if err != nil {
		return "", err
	}
	pid := inst.Roots[0].PID
	fmt.Fprintf(&r, "| RSS at start, empty queue | %s |\n", mib(procStatus(pid, "VmRSS")))
	if err := sendMessages(inst.Addr, queuedMessages, 10, queuedSize, false); err != nil {
		inst.stop(b.sup)
		return "", err
	}
	time.Sleep(3 * time.Second) // let the deferred attempts end and the heap settle
	fmt.Fprintf(&r, "| RSS idle with %d messages of %d KB queued | %s |\n", queuedMessages, queuedSize>>10, mib(procStatus(pid, "VmRSS")))
	inst.stop(b.sup)
	began := time.Now()
	inst, err = b.startSmarthost(ctx, dir, down, false)
	if err != nil {
		return "", err
	}
	fmt.Fprintf(&r, "| restart on that queue until /readyz and the banner answer | %d ms |\n", time.Since(began).Milliseconds())
	inst.stop(b.sup)

	for _, declare := range []bool{false, true} {
		dir := filepath.Join(work, fmt.Sprintf("big-size-%v", declare))
		if err := os.Mkdir(dir, 0o755); err != nil {
			return "", err
		}
		inst, err := b.startSmarthost(ctx, dir, down, false)
		if err != nil {
			return "", err
		}
		pid := inst.Roots[0].PID
		resetPeak(pid)
		before := procStatus(pid, "VmRSS")
		err = sendMessages(inst.Addr, bigClients, bigClients, bigMessage, declare)
		peak := procStatus(pid, "VmHWM")
		inst.stop(b.sup)
		if err != nil {
			return "", err
		}
		how := "without SIZE"
		if declare {
			how = "with SIZE declared"
		}
		inFlight := int64(bigClients * bigMessage)
		fmt.Fprintf(&r, "| RSS growth, %d clients × %d MB at once, %s | %s (%.2f× the %s in flight) |\n",
			bigClients, bigMessage>>20, how, mib(peak-before), float64(peak-before)/float64(inFlight), mib(inFlight))
	}

	fmt.Fprintf(&r, "\nPeak RSS (VmHWM, reset once the relay is ready) with the default configuration and an upstream that takes every message (an in-process SMTP server that discards them), against a bound of %s. VmHWM counts the pages of the queue file that the relay read through bbolt's mapping (page cache, which the kernel reclaims under pressure); the anonymous peak (RssAnon, sampled every 20 ms) leaves them out.\n\n", mib(memoryBound))
	fmt.Fprintf(&r, "| measurement | smarthost | peak RSS | |\n| --- | --- | ---: | --- |\n")
	bins := []string{b.opts.Smarthost}
	if b.opts.Baseline != "" {
		bins = []string{b.opts.Baseline, b.opts.Smarthost}
	}
	for i, bin := range bins {
		rows, err := b.peaks(ctx, filepath.Join(work, fmt.Sprintf("peaks-%d", i)), down, bin)
		if err != nil {
			return "", err
		}
		r.WriteString(rows)
	}
	return r.String(), nil
}

// peaks measures manyAtOnce and backlog with the smarthost binary bin, in
// folders under work, and returns their rows.
func (b *Bench) peaks(ctx context.Context, work, down, bin string) (string, error) {
	if err := os.Mkdir(work, 0o755); err != nil {
		return "", err
	}
	saved := b.opts.Smarthost
	b.opts.Smarthost = bin
	defer func() { b.opts.Smarthost = saved }()
	version := binaryVersion(bin)
	var rows strings.Builder
	for _, measure := range []func(context.Context, string, string) (string, string, error){b.manyAtOnce, b.backlog} {
		what, result, err := measure(ctx, work, down)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(&rows, "| %s | %s | %s |\n", what, version, result)
	}
	return rows.String(), nil
}

// binaryVersion is what `smarthost version` prints, on one line.
func binaryVersion(bin string) string {
	out, err := exec.Command(bin, "version").Output()
	if err != nil {
		return "?"
	}
	return strings.Join(strings.Fields(string(out)), " ")
}

// anonPeak samples RssAnon of a process (its heap, stacks and runtime:
// what VmHWM holds besides the queue file's pages that bbolt's mapping
// touched) until stopped, and keeps the highest value.
type anonPeak struct {
	peak atomic.Int64
	stop chan struct{}
	done chan struct{}
}

func sampleAnon(pid int) *anonPeak {
	a := &anonPeak{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(a.done)
		t := time.NewTicker(20 * time.Millisecond)
		defer t.Stop()
		for {
			a.peak.Store(max(a.peak.Load(), procStatus(pid, "RssAnon")))
			select {
			case <-a.stop:
				return
			case <-t.C:
			}
		}
	}()
	return a
}

// Stop ends the sampling and returns the peak.
func (a *anonPeak) Stop() int64 {
	close(a.stop)
	<-a.done
	return a.peak.Load()
}

// verdict says whether a peak is within memoryBound.
func verdict(peak int64) string {
	if peak <= memoryBound {
		return "under " + mib(memoryBound)
	}
	return "**over " + mib(memoryBound) + "**"
}

// resetPeak makes VmHWM the current RSS: writing 5 to clear_refs does.
func resetPeak(pid int) {
	_ = os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
}

// manyAtOnce measures the peak while manySessions clients, all in DATA at
// the same moment, each send a manySize message (no SIZE declared), until
// the sink has every one. It returns what it measured and the result.
func (b *Bench) manyAtOnce(ctx context.Context, work, _ string) (what, result string, err error) {
	what = fmt.Sprintf("%d sessions each send %d KB at once, all delivered", manySessions, manySize>>10)
	sink, err := startDiscard()
	if err != nil {
		return "", "", err
	}
	defer sink.Close()
	dir := filepath.Join(work, "many")
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", "", err
	}
	inst, err := b.startSmarthost(ctx, dir, sink.Addr, false)
	if err != nil {
		return "", "", err
	}
	defer inst.stop(b.sup)
	peak, anonymous, took, err := measurePeak(ctx, inst, sink, manySessions, 5*time.Minute, func() error {
		return sendAtOnce(inst.Addr, manySessions, manySize)
	})
	if err != nil {
		return "", "", err
	}
	spooled := countLines(inst.Logs[0], "msg=accepted", "spooled=true")
	return what, fmt.Sprintf("%s | %s (anonymous at most %s); %d of the %d spooled, the rest received into memory; %.1f s",
		mib(peak), verdict(peak), mib(anonymous), spooled, manySessions, took.Seconds()), nil
}

// backlog queues backlogMessages of backlogSize with the upstream down,
// restarts the relay with the sink as its upstream, and measures the peak
// while the default 16 workers deliver them all. It returns what it
// measured and the result.
func (b *Bench) backlog(ctx context.Context, work, down string) (what, result string, err error) {
	what = fmt.Sprintf("%d queued messages of %d MB delivered by 16 workers", backlogMessages, backlogSize>>20)
	dir := filepath.Join(work, "backlog")
	if err := os.Mkdir(dir, 0o755); err != nil {
		return "", "", err
	}
	inst, err := b.startSmarthost(ctx, dir, down, false)
	if err != nil {
		return "", "", err
	}
	err = sendMessages(inst.Addr, backlogMessages, 8, backlogSize, true)
	inst.stop(b.sup)
	if err != nil {
		return "", "", err
	}

	sink, err := startDiscard()
	if err != nil {
		return "", "", err
	}
	defer sink.Close()
	inst, err = b.startSmarthost(ctx, dir, sink.Addr, false)
	if err != nil {
		return "", "", err
	}
	defer inst.stop(b.sup)
	// The deferred messages wait for their retry: make them due now.
	peak, anonymous, took, err := measurePeak(ctx, inst, sink, backlogMessages, 15*time.Minute, func() error {
		return flushQueue(ctx, inst.HTTP)
	})
	if err != nil {
		return "", "", err
	}
	return what, fmt.Sprintf("%s | %s (anonymous at most %s); %.1f s", mib(peak), verdict(peak), mib(anonymous), took.Seconds()), nil
}

// measurePeak starts the relay inst's peak anew, runs work, and waits
// until sink has n messages. It returns the relay's peak RSS (VmHWM), the
// most anonymous memory it held meanwhile, and how long it took.
func measurePeak(ctx context.Context, inst *relayInstance, sink *Discard, n int, timeout time.Duration, work func() error) (peak, anonymous int64, took time.Duration, err error) {
	pid := inst.Roots[0].PID
	resetPeak(pid)
	anon := sampleAnon(pid)
	defer func() { anonymous = anon.Stop() }()
	began := time.Now()
	if err := work(); err != nil {
		return 0, 0, 0, err
	}
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	if _, err := sink.Counter.WaitFor(wctx, n); err != nil {
		return 0, 0, 0, fmt.Errorf("delivering the %d messages: %w", n, err)
	}
	return procStatus(pid, "VmHWM"), 0, time.Since(began), nil
}

// sendAtOnce opens n sessions, brings each into DATA, then sends a
// message of about size bytes on all of them at the same moment, and
// returns once every one was answered 250.
func sendAtOnce(addr string, n, size int) error {
	msg := messageOf(size)
	var (
		wg    sync.WaitGroup
		ready sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	fail := func(err error) {
		mu.Lock()
		first = cmp.Or(first, err)
		mu.Unlock()
	}
	start := make(chan struct{})
	ready.Add(n)
	for range n {
		wg.Go(func() {
			w, c, err := openData(addr)
			ready.Done()
			if err != nil {
				fail(err)
				return
			}
			defer c.Close()
			<-start
			if _, err := w.Write(msg); err != nil {
				fail(err)
				return
			}
			if err := w.Close(); err != nil {
				fail(err)
				return
			}
			if err := c.Quit(); err != nil {
				fail(err)
			}
		})
	}
	ready.Wait()
	close(start)
	wg.Wait()
	return first
}

// openData connects and starts a transaction up to DATA.
func openData(addr string) (io.WriteCloser, *smtp.Client, error) {
	c, err := smtp.Dial(addr)
	if err != nil {
		return nil, nil, err
	}
	if err := c.Mail(mailFrom, nil); err != nil {
		c.Close()
		return nil, nil, err
	}
	if err := c.Rcpt(rcptTo, nil); err != nil {
		c.Close()
		return nil, nil, err
	}
	w, err := c.Data()
	if err != nil {
		c.Close()
		return nil, nil, err
	}
	return w, c, nil
}

// flushQueue asks the admin API to make every queued message due now.
func flushQueue(ctx context.Context, httpAddr string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+httpAddr+"/api/queue/flush", nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("flush: %s", resp.Status)
	}
	return nil
}

// countLines counts the lines of a file that contain every one of words.
func countLines(path string, words ...string) int {
	data, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	n := 0
lines:
	for line := range strings.SplitSeq(string(data), "\n") {
		for _, w := range words {
			if !strings.Contains(line, w) {
				continue lines
			}
		}
		n++
	}
	return n
}

// sendMessages sends n messages of about size bytes over sessions
// concurrent connections, each answered 250.
func sendMessages(addr string, n, sessions, size int, declare bool) error {
	body := messageOf(size)
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	next := make(chan struct{}, n)
	for range n {
		next <- struct{}{}
	}
	close(next)
	for range sessions {
		wg.Go(func() {
			if err := sendEach(addr, body, declare, next); err != nil {
				mu.Lock()
				first = cmp.Or(first, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return first
}

// messageOf is a message of about size bytes.
func messageOf(size int) []byte {
	var body bytes.Buffer
	fmt.Fprintf(&body, "From: <%s>\r\nTo: <%s>\r\nSubject: memory\r\n\r\n", mailFrom, rcptTo)
	line := strings.Repeat("x", 76) + "\r\n"
	for body.Len() < size {
		body.WriteString(line)
	}
	return body.Bytes()
}

func sendEach(addr string, msg []byte, declare bool, next <-chan struct{}) error {
	c, err := smtp.Dial(addr)
	if err != nil {
		return err
	}
	defer c.Close()
	var opts *smtp.MailOptions
	if declare {
		opts = &smtp.MailOptions{Size: int64(len(msg))}
	}
	for range next {
		if err := c.Mail(mailFrom, opts); err != nil {
			return err
		}
		if err := c.Rcpt(rcptTo, nil); err != nil {
			return err
		}
		w, err := c.Data()
		if err != nil {
			return err
		}
		if _, err := w.Write(msg); err != nil {
			return err
		}
		if err := w.Close(); err != nil {
			return err
		}
	}
	return c.Quit()
}

// procStatus reads a "kB" field of /proc/PID/status, in bytes; 0 if absent.
func procStatus(pid int, field string) int64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(data), "\n") {
		if rest, ok := strings.CutPrefix(line, field+":"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				n, _ := strconv.ParseInt(f[0], 10, 64)
				return n << 10
			}
		}
	}
	return 0
}

func mib(n int64) string { return fmt.Sprintf("%.0f MB", float64(n)/(1<<20)) }
