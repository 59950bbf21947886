package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"smarthost/internal/testpki"
)

// The production-shaped runs compare, at each point, smarthost as
// deployed (clients that STARTTLS and AUTH, a TLS upstream, DKIM) with
// the plain relay of the matrix (no TLS, no AUTH, no DKIM), both driven
// by smtpload into an in-process upstream, so that only the relay's
// setup differs between the two.
const (
	prodPlain = "plain"
	prodFull  = "production"
	prodUser  = "bench"
)

// prodFiles are what the production-shaped relay and its client need,
// made once per benchmark in its work folder.
type prodFiles struct {
	*testpki.PKI        // the CA, and the certificate both TLS servers serve
	PassFile     string // the client's password
	Hash         string // its bcrypt hash, from `smarthost passwd`
}

// makeProdFiles makes the CA and certificate, the DKIM key if the
// matrix did not, and a password and its hash with `smarthost passwd`,
// as an operator would.
func (b *Bench) makeProdFiles(work string) (*prodFiles, error) {
	dir := filepath.Join(work, "production")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	pki, err := testpki.NewIn(dir)
	if err != nil {
		return nil, err
	}
	if b.dkimKey == "" {
		if err := b.makeDKIMKey(work); err != nil {
			return nil, err
		}
	}
	f := &prodFiles{PKI: pki, PassFile: filepath.Join(dir, "password")}
	pass := fmt.Sprintf("bench-%d", time.Now().UnixNano())
	if err := os.WriteFile(f.PassFile, []byte(pass+"\n"), 0o600); err != nil {
		return nil, err
	}
	cmd := exec.Command(b.opts.Smarthost, "passwd")
	cmd.Stdin = strings.NewReader(pass + "\n")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("smarthost passwd: %w: %s", err, stderr.String())
	}
	f.Hash = strings.TrimSpace(string(out))
	return f, nil
}

// production runs every production-shaped point, the plain relay and
// then the production-shaped one, and returns their results.
func (b *Bench) production(ctx context.Context, work string) ([]Result, error) {
	if len(b.opts.ProdSizes) == 0 {
		return nil, nil
	}
	files, err := b.makeProdFiles(work)
	if err != nil {
		return nil, err
	}
	probe, err := b.probeProd(ctx, filepath.Join(work, "probe-production"), files)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	if err != nil {
		return nil, fmt.Errorf("production-shaped probe: %w", err)
	}
	b.log.Info("probe", "target", "smarthost production", "result", probe)
	b.probes[prodFull] = probe
	var results []Result
	for _, size := range b.opts.ProdSizes {
		for _, sess := range b.opts.ProdSessions {
			for _, kind := range []string{prodPlain, prodFull} {
				pt := Point{Size: size, Sessions: sess}
				dir := filepath.Join(work, fmt.Sprintf("smtpload-%s-%d-%d", kind, size, sess))
				r := b.measureProd(ctx, kind, files, pt, dir)
				if ctx.Err() != nil {
					return nil, ctx.Err()
				}
				b.log.Info("run", "target", "smarthost "+kind, "size", formatSize(size), "sessions", sess,
					"msgs_per_s", fmt.Sprintf("%.0f", r.Rate()), "cpu_ms_per_msg", fmt.Sprintf("%.2f", r.CPUPerMsg()),
					"peak_rss_mb", fmt.Sprintf("%.1f", float64(r.PeakRSS)/(1<<20)), "err", r.Err)
				results = append(results, r)
				if !b.opts.Keep {
					_ = os.RemoveAll(dir)
				}
			}
		}
	}
	return results, nil
}

// measureProd runs one relay of the production-shaped comparison at pt,
// on a fresh upstream and a fresh relay, as measure does for the matrix.
func (b *Bench) measureProd(ctx context.Context, kind string, files *prodFiles, pt Point, dir string) Result {
	n := b.messages(pt)
	res := Result{Target: kind, Point: pt, Messages: n}
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
	full := kind == prodFull
	var sink *Discard
	var err error
	if full {
		sink, err = startDiscardTLS(files.ServerTLS())
	} else {
		sink, err = startDiscard()
	}
	if err != nil {
		return fail(err)
	}
	defer sink.Close()

	addr, err := freeAddr()
	if err != nil {
		return fail(err)
	}
	httpAddr, err := freeAddr()
	if err != nil {
		return fail(err)
	}
	text := smarthostConfig(dir, addr, httpAddr, sink.Addr, b.opts.SmarthostConns, "", false, "", "")
	if full {
		text = productionConfig(dir, addr, httpAddr, sink.Addr, b.opts.SmarthostConns, files, b.dkimKey)
	}
	if inst, err = b.runSmarthost(ctx, dir, addr, httpAddr, text); err != nil {
		return fail(err)
	}
	defer inst.stop(b.sup)
	sampler := NewSampler(inst.Roots, b.opts.Interval)
	defer sampler.Close()

	args := loadArgs(inst.Addr, pt, full, files)
	warm := b.warmup(pt)
	if err := b.load(ctx, dir, args, warm); err != nil {
		return fail(fmt.Errorf("warm-up client: %w", err))
	}
	wctx, cancel := context.WithTimeout(ctx, b.opts.Drain)
	_, err = sink.Counter.WaitFor(wctx, warm)
	cancel()
	if err != nil {
		return fail(fmt.Errorf("warm-up: %w", err))
	}
	b.settle(sampler)
	sampler.ResetPeak()

	cpu0 := sampler.CPU()
	t0 := time.Now()
	clientErr := b.load(ctx, dir, args, n)
	res.Client = time.Since(t0)
	// smtpload returns once every message was answered 250, that is
	// queued; the rest of the run is the relay's delivery.
	wctx, cancel = context.WithTimeout(ctx, b.opts.Drain)
	arrived, err := sink.Counter.WaitFor(wctx, warm+n)
	cancel()
	if err == nil {
		res.Elapsed = arrived.Sub(t0)
	}
	if clientErr != nil {
		res.Err = "client: " + clientErr.Error()
	} else if err != nil {
		res.Err = "sink: " + err.Error()
	}
	b.settle(sampler)
	res.CPU = sampler.CPU() - cpu0
	res.PeakMem = sampler.Peak()
	res.PeakRSS = sampler.PeakRSS()
	count := sink.Counter.Count()
	res.Arrived = min(count-warm, n)
	res.Extra = max(0, count-warm-n)
	res.Problems, res.Sample = inst.problems()
	return res
}

// loadArgs are smtpload's flags at pt, without -n: one message per
// connection, as smtp-source sends in the matrix; with full, STARTTLS
// trusting the benchmark's CA and AUTH.
func loadArgs(addr string, pt Point, full bool, files *prodFiles) []string {
	args := []string{"-addr", addr, "-c", strconv.Itoa(pt.Sessions), "-size", strconv.Itoa(pt.Size), "-per-conn", "1",
		"-from", mailFrom, "-to", rcptTo, "-helo", "client.bench.invalid", "-timeout", "5m", "-json"}
	if full {
		args = append(args, "-tls", "starttls", "-ca", files.CAFile, "-user", prodUser, "-pass-file", files.PassFile)
	}
	return args
}

// load runs smtpload with args for n messages and waits for it; its
// JSON result goes to load.json, its messages to client.log.
func (b *Bench) load(ctx context.Context, dir string, args []string, n int) error {
	log, err := os.OpenFile(filepath.Join(dir, "client.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer log.Close()
	var out bytes.Buffer
	cmd := exec.Command(b.opts.Smtpload, append(args, "-n", strconv.Itoa(n))...)
	cmd.Stdout, cmd.Stderr = &out, log
	p, err := b.sup.Start("smtpload", cmd)
	if err != nil {
		return err
	}
	select {
	case <-ctx.Done():
		b.sup.Stop(p)
	case <-p.Done():
		b.sup.forget(p)
	}
	_ = os.WriteFile(filepath.Join(dir, "load.json"), out.Bytes(), 0o644) // for -keep
	runErr := p.Err()
	var r struct {
		Messages int            `json:"messages"`
		Sent     int            `json:"sent"`
		Failed   map[string]int `json:"failed"`
		Conn     int            `json:"connection_errors"`
	}
	if err := json.Unmarshal(out.Bytes(), &r); err != nil {
		return fmt.Errorf("smtpload: %v, no result (%s)", runErr, lastLine(log.Name()))
	}
	if runErr != nil || r.Sent != n {
		return fmt.Errorf("smtpload: %d of %d sent, refused %v, %d connection errors (%s)", r.Sent, n, r.Failed, r.Conn, lastLine(log.Name()))
	}
	return nil
}

// productionConfig is smarthost as deployed: a STARTTLS listener that
// requires AUTH, one user, TLS to the upstream (implicit, trusting the
// benchmark's CA), and DKIM with the matrix's RSA-2048 key; the rest as
// smarthostConfig.
func productionConfig(dir, addr, httpAddr, upstream string, conns int, files *prodFiles, key string) string {
	return fmt.Sprintf(`# smarthost side-by-side benchmark, production-shaped.
hostname = "smarthost.bench.invalid"

[queue]
path = %q

[tls]
cert_file = %q
key_file = %q

[[listen]]
name = "submission"
address = %q
tls = "starttls"
auth = "required"

[limits]
max_connections_per_ip = 0            # every session comes from 127.0.0.1, as from one application server

[[user]]
name = %q
password_hash = %q
allowed_from = [%q]

[[upstream]]
name = "sink"
address = %q
tls = "implicit"
ca_file = %q
max_connections = %d

[[route]]
from_domain = "*"
upstreams = ["sink"]

[http]
address = %q

[[dkim]]
domain = %q
selector = %q
key_file = %q
`, filepath.Join(dir, "queue.db"), files.CertFile, files.KeyFile, addr, prodUser, files.Hash, "*@"+dkimDomain,
		upstream, files.CAFile, conns, httpAddr, dkimDomain, dkimSelector, key)
}

// probeProd sends one message through the production-shaped relay, with
// STARTTLS and AUTH, to a capture server that speaks only TLS, and
// checks that it arrived with a DKIM signature that verifies.
func (b *Bench) probeProd(ctx context.Context, dir string, files *prodFiles) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	capture, err := startCaptureTLS(files.ServerTLS())
	if err != nil {
		return "", err
	}
	defer capture.Close()
	addr, err := freeAddr()
	if err != nil {
		return "", err
	}
	httpAddr, err := freeAddr()
	if err != nil {
		return "", err
	}
	inst, err := b.runSmarthost(ctx, dir, addr, httpAddr, productionConfig(dir, addr, httpAddr, capture.Addr, b.opts.SmarthostConns, files, b.dkimKey))
	if err != nil {
		return "", err
	}
	defer inst.stop(b.sup)
	if err := b.load(ctx, dir, loadArgs(addr, Point{Size: 4096, Sessions: 1}, true, files), 1); err != nil {
		return "", err
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
	if err := verifySigned(msg, b.dkimRecord); err != nil {
		return "", err
	}
	return "sent with STARTTLS and AUTH, delivered over verified TLS, RSA-2048 DKIM signature verifies", nil
}
