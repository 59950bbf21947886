package main

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
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

// memoryLimits let bigMessage through.
const memoryLimits = `max_message_size = "30MB"
`

// Memory measures smarthost alone, with an upstream that refuses every
// connection, so that what it accepts stays queued: RSS idle with
// queuedMessages queued, the time to restart on that queue, and the RSS
// growth while bigClients send bigMessage each, with and without SIZE
// declared. It returns a Markdown report.
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
		// Writing 5 to clear_refs resets VmHWM to the current RSS.
		_ = os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0)
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
	return r.String(), nil
}

// sendMessages sends n messages of about size bytes over sessions
// concurrent connections, each answered 250.
func sendMessages(addr string, n, sessions, size int, declare bool) error {
	var body bytes.Buffer
	fmt.Fprintf(&body, "From: <%s>\r\nTo: <%s>\r\nSubject: memory\r\n\r\n", mailFrom, rcptTo)
	line := strings.Repeat("x", 76) + "\r\n"
	for body.Len() < size {
		body.WriteString(line)
	}
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
			if err := sendEach(addr, body.Bytes(), declare, next); err != nil {
				mu.Lock()
				first = cmp.Or(first, err)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return first
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
