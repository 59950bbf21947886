package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"smarthost/internal/postfixtest"
)

// Target is one way for the client's mail to reach the sink.
type Target struct {
	Name  string // as given to -targets
	Label string // table heading
	DKIM  bool   // the relay signs every message (RSA-2048)
	// start runs the relay in dir with upstream as its only next hop;
	// nil for the direct path, where the client talks to the sink.
	start func(ctx context.Context, b *Bench, dir, upstream string) (*relayInstance, error)
}

// Relay tells whether the target has a relay between client and sink.
func (t Target) Relay() bool { return t.start != nil }

// targets are every target, in table order.
var targets = []Target{
	{Name: "direct", Label: "direct"},
	{Name: "postfix", Label: "postfix", start: func(ctx context.Context, b *Bench, dir, up string) (*relayInstance, error) {
		return b.startPostfix(ctx, dir, up, false)
	}},
	{Name: "postfix-dkim", Label: "postfix+dkim", DKIM: true, start: func(ctx context.Context, b *Bench, dir, up string) (*relayInstance, error) {
		return b.startPostfix(ctx, dir, up, true)
	}},
	{Name: "smarthost", Label: "smarthost", start: func(ctx context.Context, b *Bench, dir, up string) (*relayInstance, error) {
		return b.startSmarthost(ctx, dir, up, false)
	}},
	{Name: "smarthost-dkim", Label: "smarthost+dkim", DKIM: true, start: func(ctx context.Context, b *Bench, dir, up string) (*relayInstance, error) {
		return b.startSmarthost(ctx, dir, up, true)
	}},
	{Name: "smarthost-pg", Label: "smarthost pg", start: func(ctx context.Context, b *Bench, dir, up string) (*relayInstance, error) {
		return b.startSmarthostCluster(ctx, dir, up, 1)
	}},
	{Name: "smarthost-pg2", Label: "smarthost pg ×2", start: func(ctx context.Context, b *Bench, dir, up string) (*relayInstance, error) {
		return b.startSmarthostCluster(ctx, dir, up, 2)
	}},
}

// relayInstance is one running relay.
type relayInstance struct {
	Addr string // its SMTP listener
	// Addrs, if set, are the listeners of several replicas, among which
	// the client shares out its sessions.
	Addrs []string
	HTTP  string     // smarthost's [http] listener
	Roots []*Process // the roots of its process trees (all its CPU and memory)
	// Logs are the relay's log files, scanned for warnings afterwards.
	Logs []string
	// problem tells whether a log line reports trouble.
	problem func(line string) bool
	// slowStop is a process stopped in the background: OpenDKIM takes
	// about 5 s to exit on SIGTERM (its milter loop polls at that pace),
	// idle all the while, and the next run need not wait for it.
	slowStop *Process
}

// stop stops every process of the relay by PID, in order (Postfix
// before its milter, so that no message is in flight between them).
func (r *relayInstance) stop(sup *Supervisor) {
	for _, p := range r.Roots {
		if p == r.slowStop {
			sup.StopLater(p)
			continue
		}
		sup.Stop(p)
	}
}

// problems returns the count of log lines reporting trouble and the
// first few of them.
func (r *relayInstance) problems() (int, []string) {
	n := 0
	var first []string
	for _, path := range r.Logs {
		f, err := os.Open(path)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			if line := sc.Text(); r.problem(line) {
				n++
				if len(first) < 3 {
					first = append(first, line)
				}
			}
		}
		f.Close()
	}
	return n, first
}

// freeAddr returns a loopback address with a port that was free a moment
// ago, for programs that must be told their port in advance.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// waitBanner waits until an SMTP server at addr greets with 220, or p
// exits, or the timeout passes.
func waitBanner(ctx context.Context, addr string, p *Process, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var last error
	for time.Now().Before(deadline) {
		select {
		case <-p.Done():
			return fmt.Errorf("%s exited before serving (%v)", p.Name, p.Err())
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if last = greet(addr); last == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond) // polling a port that is not bound yet
	}
	return fmt.Errorf("%s at %s: no SMTP greeting within %v: %w", p.Name, addr, timeout, last)
}

// greet reads an SMTP greeting and says QUIT.
func greet(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "220") {
		return fmt.Errorf("greeting %q", strings.TrimSpace(line))
	}
	_, _ = c.Write([]byte("QUIT\r\n"))
	return nil
}

// waitListen waits until addr accepts connections.
func waitListen(ctx context.Context, network, addr string, p *Process, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-p.Done():
			return fmt.Errorf("%s exited before listening (%v)", p.Name, p.Err())
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		if c, err := net.DialTimeout(network, addr, time.Second); err == nil {
			c.Close()
			return nil
		}
		time.Sleep(50 * time.Millisecond) // polling a port that is not bound yet
	}
	return fmt.Errorf("%s: %s not listening within %v", p.Name, addr, timeout)
}

// startPostfix runs a private Postfix instance: its own main.cf and
// master.cf in dir/etc, its own durable queue in dir/queue, an smtpd on a
// loopback port, every message relayed to upstream, nothing delivered
// locally. With dkim, an OpenDKIM milter signs at smtpd.
func (b *Bench) startPostfix(ctx context.Context, dir, upstream string, dkim bool) (*relayInstance, error) {
	dirs, err := postfixtest.Layout(dir)
	if err != nil {
		return nil, err
	}

	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	inst := &relayInstance{Addr: addr, problem: postfixProblem}
	ok := false
	defer func() {
		if !ok {
			inst.stop(b.sup)
		}
	}()
	milter := ""
	if dkim {
		dk, err := b.startOpenDKIM(ctx, dir)
		if err != nil {
			return nil, err
		}
		inst.Roots = append(inst.Roots, dk.proc)
		inst.slowStop = dk.proc
		milter = dk.postfix
	}

	maillog := filepath.Join(dir, "maillog")
	inst.Logs = append(inst.Logs, maillog)
	mainCF := postfixMainCF(dirs.Queue, dirs.Data, dir, maillog, upstream, milter)
	if err := postfixtest.WriteConfig(dirs.Etc, mainCF, postfixtest.MasterCF(addr)); err != nil {
		return nil, err
	}
	out, err := os.Create(filepath.Join(dir, "master.out"))
	if err != nil {
		return nil, err
	}
	defer out.Close()
	inst.Logs = append(inst.Logs, out.Name())
	cmd := postfixtest.Command(b.tools.Master, dirs)
	cmd.Stdout, cmd.Stderr = out, out
	master, err := b.sup.Start("postfix master", cmd)
	if err != nil {
		return nil, err
	}
	inst.Roots = append([]*Process{master}, inst.Roots...)
	if err := waitBanner(ctx, addr, master, 30*time.Second); err != nil {
		return nil, fmt.Errorf("postfix: %w (see %s)", err, maillog)
	}
	ok = true
	return inst, nil
}

// postfixMainCF is the instance's main.cf: a null client relaying to the
// sink, and OpenDKIM as its milter when milter is set.
func postfixMainCF(queue, data, dir, maillog, upstream, milter string) string {
	upHost, upPort, _ := net.SplitHostPort(upstream)
	extra := `# smarthost's default max_message_size, so that a 10 MB body is relayed
# by both (Postfix's default is 10240000 bytes).
message_size_limit = 26214400
`
	if milter != "" {
		extra += fmt.Sprintf("smtpd_milters = %s\nmilter_default_action = tempfail\n", milter)
	}
	d := postfixtest.Dirs{Queue: queue, Data: data}
	return postfixtest.MainCF(d, dir, maillog, "postfix.bench.invalid", "bench.invalid", "["+upHost+"]:"+upPort, extra)
}

// postfixProblem tells whether a maillog line reports trouble: a warning,
// an error, a rejection, or a message not sent at once.
func postfixProblem(line string) bool {
	// cleanup warns when a queue file's time stamp runs ahead of the
	// clock, as on a busy virtual machine: the host's clock, not the mail.
	if strings.Contains(line, "file system clock is") || strings.Contains(line, "resetting file time stamps") {
		return false
	}
	for _, s := range []string{"warning:", "error:", "fatal:", "panic:", "reject:", "status=deferred", "status=bounced", "milter-reject"} {
		if strings.Contains(line, s) {
			return true
		}
	}
	return false
}

type openDKIM struct {
	postfix string // the smtpd_milters value that reaches it
	proc    *Process
}

// startOpenDKIM runs OpenDKIM in the foreground as a signing milter, with
// the same RSA-2048 key smarthost signs with, on a loopback port or, with
// -milter unix, on a socket in dir.
func (b *Bench) startOpenDKIM(ctx context.Context, dir string) (*openDKIM, error) {
	var socket, network, addr, postfix string
	if b.opts.Milter == "unix" {
		network, addr = "unix", filepath.Join(dir, "opendkim.sock")
		socket, postfix = "local:"+addr, "unix:"+addr
	} else {
		a, err := freeAddr()
		if err != nil {
			return nil, err
		}
		host, port, _ := net.SplitHostPort(a)
		network, addr = "tcp", a
		socket, postfix = "inet:"+port+"@"+host, "inet:"+a
	}
	conf := filepath.Join(dir, "opendkim.conf")
	// RequireSafeKeys no: the key sits under the world-writable temporary
	// folder, which OpenDKIM would otherwise refuse. UMask 000: Postfix's
	// smtpd, as the postfix user, must reach a unix socket.
	text := fmt.Sprintf(`Syslog no
Mode s
Domain %s
Selector %s
KeyFile %s
RequireSafeKeys no
Canonicalization relaxed/relaxed
SignatureAlgorithm rsa-sha256
OversignHeaders From
Socket %s
UMask 000
PidFile %s
`, dkimDomain, dkimSelector, b.dkimKey, socket, filepath.Join(dir, "opendkim.pid"))
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		return nil, err
	}
	out, err := os.Create(filepath.Join(dir, "opendkim.out"))
	if err != nil {
		return nil, err
	}
	defer out.Close()
	cmd := exec.Command(b.tools.OpenDKIM, "-f", "-x", conf)
	cmd.Stdout, cmd.Stderr = out, out
	p, err := b.sup.Start("opendkim", cmd)
	if err != nil {
		return nil, err
	}
	if err := waitListen(ctx, network, addr, p, 30*time.Second); err != nil {
		b.sup.Stop(p)
		return nil, fmt.Errorf("opendkim: %w (see %s)", err, out.Name())
	}
	return &openDKIM{postfix: postfix, proc: p}, nil
}

// startSmarthost runs `smarthost serve` with a trusted-network listener
// and the sink as its only upstream; with dkim, it signs with the
// benchmark's RSA-2048 key.
func (b *Bench) startSmarthost(ctx context.Context, dir, upstream string, dkim bool) (*relayInstance, error) {
	return b.startSmarthostQueue(ctx, dir, upstream, dkim, "")
}

// startSmarthostQueue is startSmarthost with queue, more lines for its
// [queue] table.
func (b *Bench) startSmarthostQueue(ctx context.Context, dir, upstream string, dkim bool, queue string) (*relayInstance, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	httpAddr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	return b.runSmarthost(ctx, dir, addr, httpAddr, smarthostConfig(dir, addr, httpAddr, upstream, b.opts.SmarthostConns, b.dkimKey, dkim, b.extraLimits, queue))
}

// runSmarthost runs `smarthost serve` in dir with the configuration
// text, whose SMTP listener is addr and [http] listener httpAddr, and
// waits until it is ready and greets.
func (b *Bench) runSmarthost(ctx context.Context, dir, addr, httpAddr, text string) (*relayInstance, error) {
	conf := filepath.Join(dir, "smarthost.toml")
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		return nil, err
	}
	logPath := filepath.Join(dir, "smarthost.log")
	out, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer out.Close()
	cmd := exec.Command(b.opts.Smarthost, "serve", "-config", conf)
	cmd.Stdout, cmd.Stderr = out, out
	p, err := b.sup.Start("smarthost", cmd)
	if err != nil {
		return nil, err
	}
	inst := &relayInstance{Addr: addr, HTTP: httpAddr, Roots: []*Process{p}, Logs: []string{logPath}, problem: smarthostProblem}
	if err := waitReady(ctx, "http://"+httpAddr+"/readyz", p, 30*time.Second); err != nil {
		inst.stop(b.sup)
		return nil, fmt.Errorf("smarthost: %w (see %s)", err, logPath)
	}
	if err := waitBanner(ctx, addr, p, 30*time.Second); err != nil {
		inst.stop(b.sup)
		return nil, fmt.Errorf("smarthost: %w (see %s)", err, logPath)
	}
	return inst, nil
}

// smarthostConfig is the relay's configuration: defaults except for the
// loopback listener, the sink upstream and its connection limit, and
// limits and queue, lines for the [limits] and [queue] tables.
func smarthostConfig(dir, addr, httpAddr, upstream string, conns int, key string, dkim bool, limits, queue string) string {
	var b strings.Builder
	fmt.Fprintf(&b, `# smarthost side-by-side benchmark.
hostname = "smarthost.bench.invalid"

[queue]
path = %q
%s
[[listen]]
name = "bench"
address = %q
tls = "none"
auth = "none"
trusted_networks = ["127.0.0.0/8"]

[limits]
max_connections_per_ip = 0            # every session comes from 127.0.0.1, as from one application server
%s
[[upstream]]
name = "sink"
address = %q
tls = "none"
max_connections = %d

[[route]]
from_domain = "*"
upstreams = ["sink"]

[http]
address = %q
`, filepath.Join(dir, "queue.db"), queue, addr, limits, upstream, conns, httpAddr)
	if dkim {
		fmt.Fprintf(&b, `
[[dkim]]
domain = %q
selector = %q
key_file = %q
`, dkimDomain, dkimSelector, key)
	}
	return b.String()
}

// smarthostProblem tells whether a smarthost log line is a warning or
// an error, or a delivery that did not succeed at once.
func smarthostProblem(line string) bool {
	return strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") || notAtOnce.MatchString(line)
}

// notAtOnce matches a line of a recipient not delivered at once (paced
// deferrals are not warnings), or of a transaction with such recipients.
var notAtOnce = regexp.MustCompile(`\bmsg=(deferred|bounced|expired)\b|\b(deferred|failed)=[1-9]`)

// waitReady polls a /readyz URL until it answers 200.
func waitReady(ctx context.Context, url string, p *Process, timeout time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		select {
		case <-p.Done():
			return fmt.Errorf("%s exited before it was ready (%v)", p.Name, p.Err())
		case <-ctx.Done():
			return ctx.Err()
		default:
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		if err != nil {
			return err
		}
		if resp, err := client.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		time.Sleep(50 * time.Millisecond) // polling a server that is starting
	}
	return errors.New("not ready within " + timeout.String())
}
