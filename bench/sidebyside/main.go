// Command sidebyside measures smarthost against Postfix and
// Postfix+OpenDKIM on one machine, with the same client (Postfix's
// smtp-source) and the same upstream (smtp-sink) for every target, and
// prints one Markdown table. bench/run installs the Postfix tools,
// builds smarthost and runs it; see bench/README.md.
//
// Every process it starts it stops by PID, on success, on error and on
// SIGINT/SIGTERM; every listener is on 127.0.0.1.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	msgdkim "github.com/emersion/go-msgauth/dkim"

	"smarthost/dkim"
	"smarthost/internal/postfixtest"
)

// The addresses every test message carries. The DKIM domain is the
// sender's, so that both relays sign (they choose the key by From:).
const (
	mailFrom     = "bench@example.com"
	rcptTo       = "rcpt@example.net"
	dkimDomain   = "example.com"
	dkimSelector = "bench"
)

// Options are the command-line settings.
type Options struct {
	Sizes    []int // message body sizes in bytes
	Sessions []int // client sessions in parallel
	Messages int   // timed messages per run
	Warmup   int   // untimed messages before each run; 0: 2×sessions, at least 20
	// LargeMB bounds the body bytes of a timed run of a size over
	// largeSize, so that 1 MB and 10 MB points stay short.
	LargeMB int
	Targets []string // names from targets, in table order
	// Smarthost is the smarthost binary (built without -race).
	Smarthost string
	// Smtpload is the smtpload binary, the client of the
	// production-shaped runs.
	Smtpload string
	// ProdSizes × ProdSessions are the points of the production-shaped
	// runs (STARTTLS and AUTH in, TLS out, DKIM); none when empty.
	ProdSizes, ProdSessions []int
	// SmarthostConns is the upstream's max_connections.
	SmarthostConns int
	WorkDir        string // where queues live; default a new temporary folder
	Keep           bool   // keep WorkDir afterwards
	Out            string // also write the report here
	Interval       time.Duration
	// Drain is how long the sink may still wait for messages after the
	// client has finished before the run counts them as missing.
	Drain   time.Duration
	Quick   bool
	Verbose bool
	// Memory measures smarthost's memory instead of the matrix.
	Memory bool
	// Baseline, with Memory, is a second smarthost binary (an earlier
	// build) whose peaks under load are measured beside Smarthost's.
	Baseline string
	// Milter is how Postfix reaches OpenDKIM: "unix" (a socket) or
	// "inet" (a loopback port).
	Milter string
	// Args are the flags that shape the results, for the report.
	Args []string
}

// Tools are the paths of the programs the benchmark drives.
type Tools struct {
	Source, Sink, Master, Postconf, OpenDKIM string
}

// Bench runs the matrix.
type Bench struct {
	opts  Options
	tools Tools
	sup   *Supervisor
	log   *slog.Logger
	// dkimKey is the RSA-2048 key both relays sign with, made by
	// `smarthost dkim keygen`; dkimRecord is its DNS TXT value.
	dkimKey, dkimRecord string
	// probes holds, per relay target, what the check before timing found.
	probes map[string]string
	// extraLimits are lines added to smarthost's [limits] table.
	extraLimits string
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	opts, err := parseFlags(args, stderr)
	if err != nil {
		return 2
	}
	level := slog.LevelInfo
	if opts.Verbose {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level}))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	b := &Bench{opts: opts, log: log, sup: &Supervisor{Log: log, Grace: 10 * time.Second}, probes: map[string]string{}}
	measure := b.Run
	if opts.Memory {
		measure = b.Memory
	}
	report, err := measure(ctx)
	// Whatever happened, no process of ours outlives the benchmark.
	b.sup.StopAll()
	if err != nil {
		fmt.Fprintln(stderr, "sidebyside:", err)
		return 1
	}
	fmt.Fprint(stdout, report)
	if opts.Out != "" {
		if err := os.WriteFile(opts.Out, []byte(report), 0o644); err != nil {
			fmt.Fprintln(stderr, "sidebyside:", err)
			return 1
		}
	}
	return 0
}

func parseFlags(args []string, stderr io.Writer) (Options, error) {
	fs := flag.NewFlagSet("sidebyside", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o Options
	sizes := fs.String("sizes", "1KB,10KB,100KB,1MB,10MB", "message body sizes (smtp-source -l), comma-separated")
	sessions := fs.String("sessions", "1,10,50", "parallel client sessions (smtp-source -s), comma-separated")
	tg := fs.String("targets", "direct,postfix,postfix-dkim,smarthost,smarthost-dkim", "targets to run, comma-separated; smarthost-pg and smarthost-pg2 put the queue in PostgreSQL")
	fs.IntVar(&o.Messages, "n", 2000, "timed messages per run (smtp-source -m)")
	fs.IntVar(&o.Warmup, "warmup", 0, "untimed messages before each run (default 2×sessions, at least 20; one per session over 100KB)")
	fs.IntVar(&o.LargeMB, "large-mb", 200, "over 100KB, timed messages per run are at most this many MB of body (at least 2 per session)")
	fs.StringVar(&o.Smarthost, "smarthost", "", "smarthost binary (required; bench/run builds it)")
	fs.StringVar(&o.Smtpload, "smtpload", "", "smtpload binary, the client of the production-shaped runs (bench/run builds it)")
	prodSizes := fs.String("tls-sizes", "10KB,100KB", `message sizes of the production-shaped runs (smtpload STARTTLS+AUTH into smarthost, TLS upstream, DKIM), comma-separated; "" for none`)
	prodSessions := fs.String("tls-sessions", "10", "client sessions of the production-shaped runs, comma-separated")
	fs.IntVar(&o.SmarthostConns, "smarthost-conns", 20, "smarthost's upstream max_connections (Postfix's default_destination_concurrency_limit is 20)")
	fs.StringVar(&o.WorkDir, "workdir", "", "folder for the queues (default: a new temporary folder, removed afterwards)")
	fs.BoolVar(&o.Keep, "keep", false, "keep the work folder (configurations, logs, queues)")
	fs.StringVar(&o.Out, "o", "", "also write the report to this file")
	fs.DurationVar(&o.Interval, "interval", 100*time.Millisecond, "CPU and memory sampling interval")
	fs.DurationVar(&o.Drain, "drain", time.Minute, "how long to wait for the last messages after the client is done")
	fs.StringVar(&o.Milter, "milter", "unix", `how Postfix reaches OpenDKIM: "unix" (a socket, as Debian's opendkim package sets up) or "inet" (a 127.0.0.1 port)`)
	fs.BoolVar(&o.Verbose, "v", false, "log every process started and stopped")
	fs.BoolVar(&o.Quick, "quick", false, "smoke run: 1KB × 10 sessions, 500 messages (unless given)")
	fs.BoolVar(&o.Memory, "memory", false, "measure smarthost's memory (idle with 1,000 queued, restart, 20 × 25 MB at once, peaks under load) instead of the matrix")
	fs.StringVar(&o.Baseline, "baseline", "", "with -memory: an earlier smarthost binary whose peaks under load are measured too, for a before/after")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	// Paths and verbosity do not change what is measured.
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "smarthost", "smtpload", "baseline", "workdir", "keep", "o", "v":
		case "quick":
			o.Args = append(o.Args, "-quick")
		default:
			o.Args = append(o.Args, "-"+f.Name, f.Value.String())
		}
	})
	fail := func(format string, a ...any) (Options, error) {
		err := fmt.Errorf(format, a...)
		fmt.Fprintln(stderr, "sidebyside:", err)
		return o, err
	}
	if fs.NArg() > 0 {
		return fail("unexpected arguments %q", fs.Args())
	}
	// -quick changes the defaults of the matrix, not what is given.
	if o.Quick {
		if !flagSet(fs, "sizes") {
			*sizes = "1KB"
		}
		if !flagSet(fs, "sessions") {
			*sessions = "10"
		}
		if !flagSet(fs, "n") {
			o.Messages = 500
		}
		if !flagSet(fs, "tls-sizes") {
			*prodSizes = "10KB"
		}
	}
	var err error
	if o.Sizes, err = parseList(*sizes, parseSize); err != nil {
		return fail("-sizes: %v", err)
	}
	if o.Sessions, err = parseList(*sessions, strconv.Atoi); err != nil {
		return fail("-sessions: %v", err)
	}
	if strings.TrimSpace(*prodSizes) != "" && !o.Memory {
		if o.ProdSizes, err = parseList(*prodSizes, parseSize); err != nil {
			return fail("-tls-sizes: %v", err)
		}
		if o.ProdSessions, err = parseList(*prodSessions, strconv.Atoi); err != nil {
			return fail("-tls-sessions: %v", err)
		}
		if o.Smarthost == "" || o.Smtpload == "" {
			return fail(`-tls-sizes: the production-shaped runs need -smarthost and -smtpload (or -tls-sizes "" for none)`)
		}
	}
	for _, name := range strings.Split(*tg, ",") {
		name = strings.TrimSpace(name)
		if !slices.ContainsFunc(targets, func(t Target) bool { return t.Name == name }) {
			return fail("-targets: unknown target %q", name)
		}
		o.Targets = append(o.Targets, name)
	}
	if o.Milter != "inet" && o.Milter != "unix" {
		return fail(`-milter: %q, want "inet" or "unix"`, o.Milter)
	}
	if o.Messages < 1 || o.Warmup < 0 || o.SmarthostConns < 1 || o.LargeMB < 1 {
		return fail("-n, -warmup, -large-mb and -smarthost-conns must be positive")
	}
	if o.Smarthost == "" && (o.Memory || slices.ContainsFunc(o.Targets, func(n string) bool { return strings.HasPrefix(n, "smarthost") })) {
		return fail("-smarthost: the smarthost binary is required")
	}
	if o.Baseline != "" && !o.Memory {
		return fail("-baseline: only with -memory")
	}
	return o, nil
}

func flagSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

func parseList(s string, parse func(string) (int, error)) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := parse(strings.TrimSpace(f))
		if err != nil {
			return nil, err
		}
		if n < 1 {
			return nil, fmt.Errorf("%q: must be positive", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// parseSize reads "1KB", "100KB", "1MB" (units of 1024) or bytes.
func parseSize(s string) (int, error) {
	mult := 1
	switch u := strings.ToUpper(s); {
	case strings.HasSuffix(u, "KB"):
		mult, s = 1<<10, s[:len(s)-2]
	case strings.HasSuffix(u, "MB"):
		mult, s = 1<<20, s[:len(s)-2]
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("size %q: %w", s, err)
	}
	return n * mult, nil
}

// formatSize prints a size as the flags take it.
func formatSize(n int) string {
	switch {
	case n >= 1<<20 && n%(1<<20) == 0:
		return strconv.Itoa(n>>20) + " MB"
	case n >= 1<<10 && n%(1<<10) == 0:
		return strconv.Itoa(n>>10) + " KB"
	}
	return strconv.Itoa(n) + " B"
}

// findTools locates the programs the chosen targets need.
func (b *Bench) findTools(needPostfix, needDKIM bool) error {
	var err error
	look := func(name string) string {
		p, e := postfixtest.LookSbin(name)
		if e != nil {
			err = errors.Join(err, fmt.Errorf("%s not found (bench/run installs Debian's postfix and opendkim)", name))
		}
		return p
	}
	b.tools.Source, b.tools.Sink = look("smtp-source"), look("smtp-sink")
	if needPostfix {
		b.tools.Postconf = look("postconf")
		if b.tools.Postconf != "" {
			var e error
			if b.tools.Master, e = postfixtest.Master(b.tools.Postconf); e != nil {
				err = errors.Join(err, e)
			}
		}
		if os.Geteuid() != 0 {
			err = errors.Join(err, errors.New("the postfix targets need root: master starts as root and its daemons drop to the postfix user"))
		}
	}
	if needDKIM {
		b.tools.OpenDKIM = look("opendkim")
	}
	return err
}

// Run runs the whole matrix and returns the report.
func (b *Bench) Run(ctx context.Context) (string, error) {
	start := time.Now()
	var chosen []Target
	needPostfix, needDKIM := false, false
	for _, t := range targets {
		if slices.Contains(b.opts.Targets, t.Name) {
			chosen = append(chosen, t)
			needPostfix = needPostfix || strings.HasPrefix(t.Name, "postfix")
			needDKIM = needDKIM || t.Name == "postfix-dkim"
		}
	}
	if err := b.findTools(needPostfix, needDKIM); err != nil {
		return "", err
	}

	work := b.opts.WorkDir
	if work == "" {
		d, err := os.MkdirTemp("", "smarthost-bench-")
		if err != nil {
			return "", err
		}
		work = d
		if !b.opts.Keep {
			defer os.RemoveAll(work)
		}
	} else if err := os.MkdirAll(work, 0o755); err != nil {
		return "", err
	}
	// Postfix's daemons run as the postfix user and smtp-sink as nobody;
	// they must reach their folders under here.
	if err := os.Chmod(work, 0o755); err != nil {
		return "", err
	}
	if needPostfix {
		if err := searchableByAll(work); err != nil {
			return "", fmt.Errorf("postfix's daemons run as the postfix user and cannot reach the work folder: %w", err)
		}
	}
	if b.opts.Keep {
		b.log.Info("work folder kept", "dir", work)
	}
	machine := describeMachine(b.tools, b.opts.Smarthost, work)

	if slices.ContainsFunc(chosen, func(t Target) bool { return t.DKIM }) {
		if err := b.makeDKIMKey(work); err != nil {
			return "", err
		}
	}

	// Check what each relay delivers before timing it.
	var runnable []Target
	for _, t := range chosen {
		if !t.Relay() {
			runnable = append(runnable, t)
			continue
		}
		dir := filepath.Join(work, "probe-"+t.Name)
		res, err := b.probe(ctx, t, dir)
		if ctx.Err() != nil {
			return "", ctx.Err()
		}
		if err != nil {
			b.log.Error("probe failed; target skipped", "target", t.Name, "err", err)
			b.probes[t.Name] = "FAILED: " + err.Error()
			continue
		}
		if !b.opts.Keep {
			_ = os.RemoveAll(dir)
		}
		b.log.Info("probe", "target", t.Name, "result", res)
		b.probes[t.Name] = res
		runnable = append(runnable, t)
	}

	var results []Result
	for _, size := range b.opts.Sizes {
		for _, sess := range b.opts.Sessions {
			for _, t := range runnable {
				pt := Point{Size: size, Sessions: sess}
				dir := filepath.Join(work, fmt.Sprintf("%s-%d-%d", t.Name, size, sess))
				r := b.measure(ctx, t, pt, dir)
				if ctx.Err() != nil {
					return "", ctx.Err()
				}
				b.log.Info("run", "target", t.Name, "size", formatSize(size), "sessions", sess,
					"msgs_per_s", fmt.Sprintf("%.0f", r.Rate()), "cpu_ms_per_msg", fmt.Sprintf("%.2f", r.CPUPerMsg()),
					"cpu_ms_per_mb", fmt.Sprintf("%.1f", r.CPUPerMB()),
					"peak_mb", fmt.Sprintf("%.1f", float64(r.PeakMem)/(1<<20)), "peak_rss_mb", fmt.Sprintf("%.1f", float64(r.PeakRSS)/(1<<20)), "err", r.Err)
				results = append(results, r)
				if !b.opts.Keep {
					_ = os.RemoveAll(dir)
				}
			}
		}
	}
	prod, err := b.production(ctx, work)
	if err != nil {
		return "", err
	}
	machine.LoadAvgEnd = loadAvg()
	return b.report(machine, chosen, results, prod, time.Since(start)), nil
}

// searchableByAll checks that every folder from the root down to dir
// lets any user pass (o+x).
func searchableByAll(dir string) error {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	for d := abs; ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil {
			return err
		}
		if fi.Mode().Perm()&0o001 == 0 {
			return fmt.Errorf("%s is mode %v", d, fi.Mode().Perm())
		}
		if d == filepath.Dir(d) {
			return nil
		}
	}
}

// makeDKIMKey makes the RSA-2048 key with `smarthost dkim keygen`, as an
// operator would, and derives the TXT record the probe verifies with.
func (b *Bench) makeDKIMKey(work string) error {
	b.dkimKey = filepath.Join(work, "dkim-rsa2048.key")
	out, err := exec.Command(b.opts.Smarthost, "dkim", "keygen", "-domain", dkimDomain, "-selector", dkimSelector,
		"-algo", "rsa", "-bits", "2048", "-out", b.dkimKey, "-force").CombinedOutput()
	if err != nil {
		return fmt.Errorf("smarthost dkim keygen: %w: %s", err, out)
	}
	key, err := dkim.LoadKey(b.dkimKey)
	if err != nil {
		return err
	}
	b.dkimRecord, err = dkim.RecordValue(key.Public())
	return err
}

// Point is one cell of the matrix.
type Point struct {
	Size, Sessions int
}

// Result is one target at one point.
type Result struct {
	Target string
	Point
	Messages int           // timed messages sent
	Arrived  int           // of them, counted at the sink
	Extra    int           // counted beyond Messages (duplicates)
	Client   time.Duration // from the client's start to its exit
	Elapsed  time.Duration // from the client's start to the last arrival
	CPU      time.Duration // relay CPU over the timed window
	PeakMem  int64         // relay PSS peak over the timed window
	PeakRSS  int64         // relay RSS peak over the timed window
	Problems int           // relay log lines reporting trouble
	Sample   []string      // the first of them
	Err      string        // why the run is incomplete; "" when it is not
}

// Rate is messages per second at the sink, 0 for an incomplete run.
func (r Result) Rate() float64 {
	if r.Err != "" || r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Messages) / r.Elapsed.Seconds()
}

// CPUPerMsg is the relay's CPU milliseconds per message.
func (r Result) CPUPerMsg() float64 {
	if r.Messages == 0 {
		return 0
	}
	return float64(r.CPU) / float64(time.Millisecond) / float64(r.Messages)
}

// CPUPerMB is the relay's CPU milliseconds per MiB of message body.
func (r Result) CPUPerMB() float64 {
	mb := float64(r.Messages) * float64(r.Size) / (1 << 20)
	if mb == 0 {
		return 0
	}
	return float64(r.CPU) / float64(time.Millisecond) / mb
}

// runLimit bounds one timed run, whatever the client and relay do.
const runLimit = 10 * time.Minute

// largeSize is the largest body size every run sends -n messages of.
const largeSize = 100 << 10

// messages is the timed message count at pt: -n, or over largeSize as
// many as -large-mb holds, at least two per session.
func (b *Bench) messages(pt Point) int {
	if pt.Size <= largeSize {
		return b.opts.Messages
	}
	return min(b.opts.Messages, max(2*pt.Sessions, b.opts.LargeMB<<20/pt.Size))
}

// warmup is the untimed message count at pt: one per session over
// largeSize is enough to open the connections and grow the heaps.
func (b *Bench) warmup(pt Point) int {
	if b.opts.Warmup > 0 {
		return b.opts.Warmup
	}
	if pt.Size > largeSize {
		return pt.Sessions
	}
	return max(20, 2*pt.Sessions)
}

// measure runs one target at one point on a fresh sink and a fresh
// relay (empty queue), and stops both.
func (b *Bench) measure(ctx context.Context, t Target, pt Point, dir string) Result {
	n := b.messages(pt)
	res := Result{Target: t.Name, Point: pt, Messages: n}
	var inst *relayInstance
	fail := func(err error) Result {
		res.Err = err.Error()
		if inst != nil {
			res.Problems, res.Sample = inst.problems()
		}
		return res
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fail(err)
	}
	logFile, err := os.Create(filepath.Join(dir, "sink.log"))
	if err != nil {
		return fail(err)
	}
	defer logFile.Close()
	sinkAddr, err := freeAddr()
	if err != nil {
		return fail(err)
	}
	sink, err := startSink(b.sup, b.tools.Sink, sinkAddr, logFile)
	if err != nil {
		return fail(err)
	}
	defer b.sup.Stop(sink.Proc)
	if err := waitBanner(ctx, sinkAddr, sink.Proc, 10*time.Second); err != nil {
		return fail(err)
	}

	addrs := []string{sinkAddr}
	var sampler *Sampler
	if t.Relay() {
		started, err := t.start(ctx, b, dir, sinkAddr)
		if err != nil {
			return fail(err)
		}
		inst = started
		defer inst.stop(b.sup)
		addrs = []string{inst.Addr}
		if len(inst.Addrs) > 0 {
			addrs = inst.Addrs
		}
		sampler = NewSampler(inst.Roots, b.opts.Interval)
		defer sampler.Close()
	}

	// Warm-up: the relay forks its daemons, grows its heap, opens its
	// upstream connections; none of it is timed.
	warm := b.warmup(pt)
	if err := b.clients(ctx, dir, addrs, pt, warm).Err(); err != nil {
		return fail(fmt.Errorf("warm-up client: %w (%s)", err, lastLine(filepath.Join(dir, "client.log"))))
	}
	wctx, cancel := context.WithTimeout(ctx, b.opts.Drain)
	_, err = sink.Counter.WaitFor(wctx, warm)
	cancel()
	if err != nil {
		return fail(fmt.Errorf("warm-up: %w", err))
	}
	if sampler != nil {
		b.settle(sampler)
		sampler.ResetPeak()
	}

	// Timed: from the client's start to the last message at the sink.
	var cpu0 time.Duration
	if sampler != nil {
		cpu0 = sampler.CPU()
	}
	t0 := time.Now()
	client := b.clients(ctx, dir, addrs, pt, n)
	want := warm + n
	wctx, cancel = context.WithTimeout(ctx, runLimit)
	defer cancel()
	var clientErr error
	clientDone := make(chan struct{})
	go func() {
		defer close(clientDone)
		clientErr = client.Err()
		res.Client = time.Since(t0)
		// Once the client is done, whatever is still queued in the relay
		// gets Drain to arrive.
		t := time.AfterFunc(b.opts.Drain, cancel)
		<-wctx.Done()
		t.Stop()
	}()
	arrived, err := sink.Counter.WaitFor(wctx, want)
	if err == nil {
		res.Elapsed = arrived.Sub(t0)
	}
	cancel()
	select {
	case <-clientDone:
	case <-time.After(b.opts.Drain):
		client.stop(b.sup)
		<-clientDone
	}
	if clientErr != nil {
		res.Err = fmt.Sprintf("client: %v (%s)", clientErr, lastLine(filepath.Join(dir, "client.log")))
	} else if err != nil {
		res.Err = fmt.Sprintf("sink: %v", err)
	}
	if sampler != nil {
		b.settle(sampler)
		res.CPU = sampler.CPU() - cpu0
		res.PeakMem = sampler.Peak()
		res.PeakRSS = sampler.PeakRSS()
	}
	count := sink.Counter.Count()
	res.Arrived = min(count-warm, n)
	res.Extra = max(0, count-want)
	if inst != nil {
		res.Problems, res.Sample = inst.problems()
	}
	return res
}

// settle waits until the relay is idle: its CPU time has not grown by a
// clock tick over three samples (the relay finishing its bookkeeping
// after the last delivery, such as removing the queue file), or 5 s.
func (b *Bench) settle(s *Sampler) {
	deadline := time.Now().Add(5 * time.Second)
	last, still := s.CPU(), 0
	for still < 3 && time.Now().Before(deadline) {
		time.Sleep(b.opts.Interval) // sampling interval
		now := s.CPU()
		if now-last < time.Second/clockTicks {
			still++
		} else {
			still = 0
		}
		last = now
	}
}

// client starts smtp-source against addr: n messages of pt.Size body
// bytes over pt.Sessions parallel sessions, one message per connection.
func (b *Bench) client(ctx context.Context, dir, addr string, pt Point, n int) *Process {
	log, err := os.OpenFile(filepath.Join(dir, "client.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return failedProcess(err)
	}
	defer log.Close()
	cmd := exec.Command(b.tools.Source, clientArgs(addr, pt, n)...)
	cmd.Stdout, cmd.Stderr = log, log
	p, err := b.sup.Start("smtp-source", cmd)
	if err != nil {
		return failedProcess(err)
	}
	go func() {
		select {
		case <-ctx.Done():
			b.sup.Stop(p)
		case <-p.Done():
			b.sup.forget(p)
		}
	}()
	return p
}

// clientGroup is the smtp-source processes of one run.
type clientGroup []*Process

// clients starts one smtp-source per address, sharing pt's sessions and
// the n messages out evenly among them (one address: one client, as
// client).
func (b *Bench) clients(ctx context.Context, dir string, addrs []string, pt Point, n int) clientGroup {
	k := max(1, min(len(addrs), pt.Sessions))
	g := make(clientGroup, k)
	for i := range k {
		share := Point{Size: pt.Size, Sessions: pt.Sessions / k}
		if i < pt.Sessions%k {
			share.Sessions++
		}
		m := n / k
		if i < n%k {
			m++
		}
		g[i] = b.client(ctx, dir, addrs[i], share, m)
	}
	return g
}

// Err waits for every client and returns the first failure.
func (g clientGroup) Err() error {
	var first error
	for _, p := range g {
		if err := p.Err(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

func (g clientGroup) stop(sup *Supervisor) {
	for _, p := range g {
		sup.Stop(p)
	}
}

// clientArgs are smtp-source's flags, identical for every target.
func clientArgs(addr string, pt Point, n int) []string {
	return []string{"-s", strconv.Itoa(pt.Sessions), "-m", strconv.Itoa(n), "-l", strconv.Itoa(pt.Size),
		"-f", mailFrom, "-t", rcptTo, "-M", "client.bench.invalid", addr}
}

// failedProcess is a Process that never ran.
func failedProcess(err error) *Process {
	p := &Process{Name: "(not started)", done: make(chan struct{}), err: err}
	close(p.done)
	return p
}

// lastLine returns the last non-empty line of a file.
func lastLine(path string) string {
	data, _ := os.ReadFile(path)
	last := "no output"
	for line := range strings.Lines(strings.ReplaceAll(string(data), "\r", "\n")) {
		if l := strings.TrimSpace(line); l != "" {
			last = l
		}
	}
	return last
}

// probe sends one message through the relay to an in-process capture
// server and checks it arrived with its body whole, signed with a valid
// RSA signature for example.com when the target signs, and unsigned
// otherwise.
func (b *Bench) probe(ctx context.Context, t Target, dir string) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	capture, err := startCapture()
	if err != nil {
		return "", err
	}
	defer capture.Close()
	inst, err := t.start(ctx, b, dir, capture.Addr)
	if err != nil {
		return "", err
	}
	defer inst.stop(b.sup)
	const size = 4096
	if err := b.client(ctx, dir, inst.Addr, Point{Size: size, Sessions: 1}, 1).Err(); err != nil {
		return "", fmt.Errorf("client: %w (%s)", err, lastLine(filepath.Join(dir, "client.log")))
	}
	var msg []byte
	select {
	case msg = <-capture.Messages:
	case <-time.After(30 * time.Second):
		return "", errors.New("the probe message did not arrive within 30 s")
	case <-ctx.Done():
		return "", ctx.Err()
	}
	_ = os.WriteFile(filepath.Join(dir, "probe.eml"), msg, 0o644) // for -keep
	return checkProbe(msg, size, t.DKIM, b.dkimRecord)
}

// checkProbe checks one delivered probe message.
func checkProbe(msg []byte, size int, signed bool, record string) (string, error) {
	_, body, ok := strings.Cut(string(msg), "\r\n\r\n")
	if !ok {
		return "", errors.New("probe: no header/body separator")
	}
	// smtp-source sends size bytes of body, CRLFs included, and then the
	// CRLF that ends the last line.
	if got := len(body); got < size || got > size+2 {
		return "", fmt.Errorf("probe: body of %d bytes, want %d", got, size)
	}
	verifs, err := verifyDKIM(msg, record)
	if err != nil {
		return "", err
	}
	if !signed {
		if len(verifs) > 0 {
			return "", fmt.Errorf("probe: %d DKIM signatures on a message that should be unsigned", len(verifs))
		}
		return "delivered intact, unsigned", nil
	}
	if err := oneValid(verifs); err != nil {
		return "", err
	}
	return "delivered intact, RSA-2048 DKIM signature verifies", nil
}

// verifyDKIM verifies msg's DKIM signatures with record as the
// benchmark key's TXT record.
func verifyDKIM(msg []byte, record string) ([]*msgdkim.Verification, error) {
	verifs, err := msgdkim.VerifyWithOptions(bytes.NewReader(msg), &msgdkim.VerifyOptions{
		LookupTXT: func(domain string) ([]string, error) {
			if domain != dkimSelector+"._domainkey."+dkimDomain {
				return nil, fmt.Errorf("no TXT record for %s", domain)
			}
			return []string{record}, nil
		},
	})
	if err != nil {
		return nil, fmt.Errorf("probe: DKIM: %w", err)
	}
	return verifs, nil
}

// verifySigned checks that msg carries one valid signature for
// example.com.
func verifySigned(msg []byte, record string) error {
	verifs, err := verifyDKIM(msg, record)
	if err != nil {
		return err
	}
	return oneValid(verifs)
}

func oneValid(verifs []*msgdkim.Verification) error {
	if len(verifs) != 1 {
		return fmt.Errorf("probe: %d DKIM signatures, want 1", len(verifs))
	}
	if v := verifs[0]; v.Err != nil || v.Domain != dkimDomain {
		return fmt.Errorf("probe: DKIM signature d=%s: %v", v.Domain, v.Err)
	}
	return nil
}
