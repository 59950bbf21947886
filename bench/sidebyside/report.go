package main

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"
)

// report renders the machine, the method, the table and the details.
func (b *Bench) report(m Machine, chosen []Target, results, prod []Result, took time.Duration) string {
	var w strings.Builder
	p := func(format string, a ...any) { fmt.Fprintf(&w, format, a...) }

	p("# smarthost and Postfix, side by side\n\n")
	p("Made by `bench/run %s` on %s, in %s.\n\n", strings.Join(b.opts.Args, " "), time.Now().UTC().Format("2006-01-02 15:04 MST"), took.Round(time.Second))
	p("## Machine\n\n")
	p("- CPU: %s, %d cores; RAM %s\n", m.CPU, m.Cores, m.RAM)
	p("- OS: %s, kernel %s\n", m.OS, m.Kernel)
	p("- Queues (both relays) on: %s\n", m.Disk)
	p("- Load average (1, 5, 15 min): %s at the start, %s at the end\n", m.LoadAvg, m.LoadAvgEnd)
	if f := strings.Fields(m.LoadAvg); len(f) > 0 {
		if load, err := strconv.ParseFloat(f[0], 64); err == nil && load >= 1 {
			p("- **Busy machine**: the load average was %.1f when the run started; other work took CPU from the relays, so these figures are not representative\n", load)
		}
	}
	p("- Postfix %s (smtp-source, smtp-sink), OpenDKIM %s, %s, smarthost %s\n\n", m.Postfix, m.OpenDKIM, m.Go, m.Smarthost)

	p("## Method\n\n")
	warm := "2 × sessions (at least 20; one per session over 100 KB)"
	if b.opts.Warmup > 0 {
		warm = fmt.Sprint(b.opts.Warmup)
	}
	p("- Client, the same for every target: `smtp-source -s SESSIONS -m N -l SIZE -f %s -t %s` — N messages per run over SESSIONS parallel sessions, a new SMTP connection for each message (smtp-source's default), one recipient, SIZE bytes of body after a few header lines (smtp-source fills a body of any size, 10 MB included); preceded by %s untimed warm-up messages.\n",
		mailFrom, rcptTo, warm)
	p("- N = %d up to 100 KB; over 100 KB, as many as %d MB of body holds, at least 2 per session and at most %d (%s), so that a large size costs seconds, not minutes.\n",
		b.opts.Messages, b.opts.LargeMB, b.opts.Messages, largeCounts(b, b.opts.Sizes, b.opts.Sessions))
	p("- Upstream, the same for every target: Postfix's `smtp-sink -c` on 127.0.0.1, a fresh one per run. **msgs/s** = messages ÷ (time from the client's start to the arrival of the last of them at the sink, read from smtp-sink's counter).\n")
	p("- direct: the client talks to the sink itself, no relay: the ceiling of client and sink.\n")
	p("- postfix: a private Postfix instance (own main.cf, master.cf and queue in the work folder, started as `master -c DIR -s`): smtpd on a loopback port, `relayhost = [127.0.0.1]:SINKPORT`, `mynetworks = 127.0.0.0/8`, no local delivery, the durable queue as by default, logging through postlogd to a file, no chroot, `message_size_limit = 26214400` (smarthost's default 25 MB, for the 10 MB point); Postfix's defaults otherwise.\n")
	milter := "a unix socket (`smtpd_milters = unix:…`, as Debian's opendkim package sets up)"
	if b.opts.Milter == "inet" {
		milter = "a loopback port (`smtpd_milters = inet:127.0.0.1:PORT`)"
	}
	p("- postfix+dkim: the same, with OpenDKIM as a milter on %s, in the foreground with its own config (mode s, relaxed/relaxed, rsa-sha256, From oversigned), signing with an RSA-2048 key.\n", milter)
	p("- smarthost: `smarthost serve` with one listener (`tls = \"none\"`, `auth = \"none\"`, `trusted_networks = [\"127.0.0.0/8\"]`), the sink as its only upstream (`tls = \"none\"`, `max_connections = %d`, as Postfix's default_destination_concurrency_limit), its bbolt queue beside Postfix's; defaults otherwise (text log to a file).\n", b.opts.SmarthostConns)
	p("- smarthost+dkim: the same with a `[[dkim]]` key: the same RSA-2048 key OpenDKIM uses, made by `smarthost dkim keygen`.\n")
	p("- smarthost pg: the same relay with its queue in PostgreSQL (`[queue] backend = \"postgres\"`): a server of its own on this machine, made by initdb for the run, on a Unix socket, durable (fsync on, Debian's defaults otherwise but 128MB shared_buffers).\n")
	p("- smarthost pg ×2: two such relays on one PostgreSQL; the client sessions and messages are shared out evenly between them (one smtp-source per relay), as a Service that balances connections in the kernel would.\n")
	p("- **CPU ms/msg**: user+system CPU of every process of the relay — for Postfix, master and every daemon it forks (an exited daemon's CPU counts through master's reaped-children times), plus opendkim; for smarthost pg, PostgreSQL's server and backends too — from the client's start until the relay is idle after the last arrival, ÷ messages; from /proc/PID/stat, sampled every %v.\n", b.opts.Interval)
	p("- **CPU ms/MB**: the same CPU ÷ MB (MiB) of message body relayed (N × SIZE), the cost per byte that large messages pay.\n")
	p("- **peak RSS MB**: the highest sum of resident memory (/proc/PID/stat, shared pages counted in each process) over the relay's processes during the timed run, sampled every %v.\n", b.opts.Interval)
	p("- **peak MB**: the highest sum of PSS (/proc/PID/smaps_rollup; shared pages split among the processes sharing them) over the relay's processes during the timed run, sampled every %v.\n", b.opts.Interval)
	p("- State: every run starts a fresh sink and a fresh relay with an empty queue; nothing carries over between points.\n")
	var probes []string
	for _, t := range chosen {
		if t.Relay() {
			probes = append(probes, t.Label+": "+b.probes[t.Name])
		}
	}
	if len(probes) > 0 {
		p("- Before timing, each relay carried one probe message to a capture server: %s.\n", strings.Join(probes, "; "))
	}
	p("\n")

	p("## Results\n\n")
	p("%s\n", resultsTable(chosen, results, b.opts.Sizes, b.opts.Sessions))
	p("## CPU per MB and peak memory\n\n")
	p("%s\n", costTable(chosen, results, b.opts.Sizes, b.opts.Sessions))
	if len(prod) > 0 {
		p("## Production-shaped: STARTTLS and AUTH in, TLS out, DKIM\n\n")
		p("How every real deployment runs, beside the plain relay of the matrix, both driven by `smtpload` (cmd/smtpload) into an upstream in the benchmark's own process that reads each message and discards it:\n\n")
		p("- plain: smarthost as in the matrix's smarthost column (`tls = \"none\"`, `auth = \"none\"`, trusted 127.0.0.0/8, plain-text upstream, no DKIM); client `smtpload -c SESSIONS -n N -size SIZE -per-conn 1 -from %s -to %s`.\n", mailFrom, rcptTo)
		p("- production: a listener with `tls = \"starttls\"` and `auth = \"required\"`, one `[[user]]` whose bcrypt hash (cost 10) `smarthost passwd` made; the upstream with `tls = \"implicit\"` and `ca_file`, the certificate verified; the `[[dkim]]` RSA-2048 key of smarthost+dkim. The client adds `-tls starttls -ca ca.pem -user %s -pass-file FILE`: every message on a new connection, so each pays a TLS handshake and an AUTH (the relay checks bcrypt once per password and remembers it, as in production). Certificates: a CA and one ECDSA P-256 certificate for 127.0.0.1, made for the run in its work folder, served by both the listener and the upstream; TLS 1.3 as Go negotiates it.\n", prodUser)
		p("- SIZE is the whole message, headers included (smtpload's -size); N, warm-up, msgs/s (to the last arrival at the upstream) and CPU as in the matrix; the upstream's CPU is the benchmark's, not counted.\n")
		p("- Before timing, the production-shaped relay carried one probe message to a capture server: %s.\n", b.probes[prodFull])
		p("- **tax** = production ÷ plain: of throughput (below 1 is slower) and of CPU per message (above 1 costs more).\n\n")
		p("%s\n", productionTable(prod, results))
	}
	p("## Runs\n\n")
	p("%s\n", detailsTable(chosen, append(slices.Clip(results), prod...)))
	var notes []string
	for _, r := range append(slices.Clip(results), prod...) {
		if r.Err != "" {
			notes = append(notes, fmt.Sprintf("- %s %s × %d: **%s**", targetLabel(chosen, r.Target), formatSize(r.Size), r.Sessions, r.Err))
		}
		if r.Extra > 0 {
			notes = append(notes, fmt.Sprintf("- %s %s × %d: %d messages more than sent arrived at the sink (duplicates)", targetLabel(chosen, r.Target), formatSize(r.Size), r.Sessions, r.Extra))
		}
		if r.Problems > 0 {
			notes = append(notes, fmt.Sprintf("- %s %s × %d: %d log lines reporting trouble, first: `%s`", targetLabel(chosen, r.Target), formatSize(r.Size), r.Sessions, r.Problems, strings.Join(r.Sample, "` · `")))
		}
	}
	if len(notes) > 0 {
		p("## Problems\n\n%s\n", strings.Join(notes, "\n"))
	}
	return w.String()
}

// largeCounts lists N at each point over 100 KB, "1 MB × 10: 200".
func largeCounts(b *Bench, sizes, sessions []int) string {
	var out []string
	for _, size := range sizes {
		for _, sess := range sessions {
			if pt := (Point{Size: size, Sessions: sess}); size > largeSize {
				out = append(out, fmt.Sprintf("%s × %d: %d", formatSize(size), sess, b.messages(pt)))
			}
		}
	}
	if len(out) == 0 {
		return "no size of this run is over 100 KB"
	}
	return strings.Join(out, ", ")
}

// findResult returns the run of the target named name at pt.
func findResult(results []Result, name string, pt Point) (Result, bool) {
	i := slices.IndexFunc(results, func(r Result) bool { return r.Target == name && r.Point == pt })
	if i < 0 {
		return Result{}, false
	}
	return results[i], true
}

// costTable has, per point, each relay's CPU per MB of body beside its
// CPU per message, and its peak RSS beside its peak PSS.
func costTable(chosen []Target, results []Result, sizes, sessions []int) string {
	var relays []Target
	for _, t := range chosen {
		if t.Relay() {
			relays = append(relays, t)
		}
	}
	head := []string{"size", "sessions"}
	for _, t := range relays {
		head = append(head, t.Label+" CPU ms/MB")
	}
	for _, t := range relays {
		head = append(head, t.Label+" peak RSS MB")
	}
	rows := [][]string{head}
	for _, size := range sizes {
		for _, sess := range sessions {
			pt := Point{Size: size, Sessions: sess}
			row := []string{formatSize(size), fmt.Sprint(sess)}
			for _, t := range relays {
				r, ok := findResult(results, t.Name, pt)
				row = append(row, cell(ok && r.Err == "", "%.1f", r.CPUPerMB()))
			}
			for _, t := range relays {
				r, ok := findResult(results, t.Name, pt)
				row = append(row, cell(ok && r.Err == "", "%.0f", float64(r.PeakRSS)/(1<<20)))
			}
			rows = append(rows, row)
		}
	}
	return markdown(rows)
}

// prodLabels name the production-shaped runs in the details.
var prodLabels = map[string]string{
	prodPlain: "smarthost plain (smtpload)",
	prodFull:  "smarthost STARTTLS+AUTH, TLS upstream, DKIM (smtpload)",
}

// productionTable has one row per production-shaped point: the plain
// and the production-shaped relay, the tax as ratios, and the matrix's
// smarthost at the same point where it ran.
func productionTable(prod, matrix []Result) string {
	rows := [][]string{{"size", "sessions", "plain msgs/s", "production msgs/s", "throughput tax", "plain CPU ms/msg", "production CPU ms/msg", "CPU tax",
		"plain peak RSS MB", "production peak RSS MB", "matrix smarthost msgs/s (smtp-source)"}}
	var points []Point
	for _, r := range prod {
		if !slices.Contains(points, r.Point) {
			points = append(points, r.Point)
		}
	}
	for _, pt := range points {
		plain, okP := findResult(prod, prodPlain, pt)
		full, okF := findResult(prod, prodFull, pt)
		okP, okF = okP && plain.Err == "", okF && full.Err == ""
		m, okM := findResult(matrix, "smarthost", pt)
		rows = append(rows, []string{formatSize(pt.Size), fmt.Sprint(pt.Sessions),
			rateCell(plain, true), rateCell(full, true),
			cell(okP && okF && plain.Rate() > 0, "%.2f×", full.Rate()/plain.Rate()),
			cell(okP, "%.2f", plain.CPUPerMsg()), cell(okF, "%.2f", full.CPUPerMsg()),
			cell(okP && okF && plain.CPU > 0, "%.2f×", full.CPUPerMsg()/plain.CPUPerMsg()),
			cell(okP, "%.0f", float64(plain.PeakRSS)/(1<<20)), cell(okF, "%.0f", float64(full.PeakRSS)/(1<<20)),
			cell(okM && m.Err == "", "%.0f", m.Rate()),
		})
	}
	return markdown(rows)
}

// resultsTable is the main table: one row per point.
func resultsTable(chosen []Target, results []Result, sizes, sessions []int) string {
	find := func(name string, pt Point) (Result, bool) { return findResult(results, name, pt) }
	var head []string
	head = append(head, "size", "sessions")
	for _, t := range chosen {
		head = append(head, t.Label+" msgs/s")
	}
	for _, t := range chosen {
		if t.Relay() {
			head = append(head, t.Label+" CPU ms/msg")
		}
	}
	for _, t := range chosen {
		if t.Relay() {
			head = append(head, t.Label+" peak MB")
		}
	}
	has := func(name string) bool {
		return slices.ContainsFunc(chosen, func(t Target) bool { return t.Name == name })
	}
	ratios := [][2]string{}
	if has("smarthost") && has("postfix") {
		ratios = append(ratios, [2]string{"smarthost", "postfix"})
		head = append(head, "smarthost / postfix")
	}
	if has("smarthost-dkim") && has("postfix-dkim") {
		ratios = append(ratios, [2]string{"smarthost-dkim", "postfix-dkim"})
		head = append(head, "smarthost+dkim / postfix+dkim")
	}
	rows := [][]string{head}
	for _, size := range sizes {
		for _, sess := range sessions {
			pt := Point{Size: size, Sessions: sess}
			row := []string{formatSize(size), fmt.Sprint(sess)}
			for _, t := range chosen {
				r, ok := find(t.Name, pt)
				row = append(row, rateCell(r, ok))
			}
			for _, t := range chosen {
				if t.Relay() {
					r, ok := find(t.Name, pt)
					row = append(row, cell(ok && r.Err == "", "%.2f", r.CPUPerMsg()))
				}
			}
			for _, t := range chosen {
				if t.Relay() {
					r, ok := find(t.Name, pt)
					row = append(row, cell(ok && r.Err == "", "%.0f", float64(r.PeakMem)/(1<<20)))
				}
			}
			for _, pair := range ratios {
				a, okA := find(pair[0], pt)
				c, okC := find(pair[1], pt)
				row = append(row, cell(okA && okC && a.Rate() > 0 && c.Rate() > 0, "%.2f×", a.Rate()/c.Rate()))
			}
			rows = append(rows, row)
		}
	}
	return markdown(rows)
}

// targetLabel is the name of a run's target in the tables.
func targetLabel(chosen []Target, name string) string {
	for _, t := range chosen {
		if t.Name == name {
			return t.Label
		}
	}
	if l, ok := prodLabels[name]; ok {
		return l
	}
	return name
}

// detailsTable has one row per run, with where its time went.
func detailsTable(chosen []Target, results []Result) string {
	label := func(name string) string { return targetLabel(chosen, name) }
	rows := [][]string{{"target", "size", "sessions", "messages", "arrived", "client done s", "last arrival s", "msgs/s", "relay CPU s", "CPU ms/msg", "CPU ms/MB", "peak MB", "peak RSS MB", "log problems"}}
	for _, r := range results {
		rows = append(rows, []string{
			label(r.Target), formatSize(r.Size), fmt.Sprint(r.Sessions), fmt.Sprint(r.Messages), fmt.Sprint(r.Arrived),
			fmt.Sprintf("%.2f", r.Client.Seconds()), cell(r.Elapsed > 0, "%.2f", r.Elapsed.Seconds()),
			rateCell(r, true), fmt.Sprintf("%.2f", r.CPU.Seconds()), fmt.Sprintf("%.2f", r.CPUPerMsg()), fmt.Sprintf("%.1f", r.CPUPerMB()),
			fmt.Sprintf("%.0f", float64(r.PeakMem)/(1<<20)), fmt.Sprintf("%.0f", float64(r.PeakRSS)/(1<<20)), fmt.Sprint(r.Problems),
		})
	}
	return markdown(rows)
}

func rateCell(r Result, ok bool) string {
	switch {
	case !ok:
		return "–"
	case r.Err != "":
		return fmt.Sprintf("FAIL (%d/%d)", r.Arrived, r.Messages)
	}
	return fmt.Sprintf("%.0f", r.Rate())
}

func cell(ok bool, format string, v float64) string {
	if !ok {
		return "–"
	}
	return fmt.Sprintf(format, v)
}

// markdown renders rows (the first is the heading) as a Markdown table,
// numbers right-aligned.
func markdown(rows [][]string) string {
	var w strings.Builder
	for i, row := range rows {
		w.WriteString("| " + strings.Join(row, " | ") + " |\n")
		if i == 0 {
			seps := make([]string, len(row))
			for j := range row {
				seps[j] = "---:"
				if j == 0 {
					seps[j] = "---"
				}
			}
			w.WriteString("| " + strings.Join(seps, " | ") + " |\n")
		}
	}
	return w.String()
}
