package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"sync"
	"time"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/relay/upstream"
)

const checkUpstreamUsage = `usage: smarthost check-upstream [-config PATH] [-from ADDR] [-to ADDR] [-timeout 15s] [-json] [NAME]

Connects to each configured upstream (or only NAME) as a delivery would and
reports the TLS session and certificate, the EHLO extensions, the login, and
the replies to MAIL FROM and RCPT TO for test addresses, then RSET: no message
is sent. Each upstream ends with a verdict and, for the usual mistakes, the fix.

  -from ADDR   MAIL FROM to try (default: the upstream's envelope_from, else its
               username when that is an address, else MAIL FROM is skipped)
  -to ADDR     RCPT TO to try (default: none)

Exit status: 0 when every upstream checked passes, 1 when one fails, 2 for a
bad command line or configuration.
`

// stepLabels are the names check-upstream prints for the steps.
var stepLabels = map[string]string{
	upstream.StepMail: "mail from",
	upstream.StepRcpt: "rcpt to",
}

func runCheckUpstream(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("check-upstream", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, checkUpstreamUsage) }
	path := fs.String("config", defaultConfigPath(), "configuration file (env SMARTHOST_CONFIG)")
	from := fs.String("from", "", "MAIL FROM address to try")
	to := fs.String("to", "", "RCPT TO address to try")
	timeout := fs.Duration("timeout", 15*time.Second, "bound on connecting and on each reply")
	asJSON := fs.Bool("json", false, "print the reports as JSON")
	// Flags may also follow the name: parse again after it.
	var names []string
	for rest := args; ; {
		if err := fs.Parse(rest); err != nil {
			return 2
		}
		if fs.NArg() == 0 {
			break
		}
		names = append(names, fs.Arg(0))
		rest = fs.Args()[1:]
	}
	if len(names) > 1 || *timeout <= 0 {
		fmt.Fprint(stderr, checkUpstreamUsage)
		return 2
	}
	for _, a := range []string{*from, *to} {
		if a != "" {
			if err := config.CheckMailbox(a); err != nil {
				fmt.Fprintf(stderr, "smarthost check-upstream: %v\n", err)
				return 2
			}
		}
	}
	// Only the upstreams' secrets are read, and only NAME's when given:
	// one upstream can be checked without the others' credentials.
	only := ""
	if len(names) == 1 {
		only = names[0]
	}
	cfg, err := config.LoadFiltered(*path, config.UpstreamSecrets(only))
	if err != nil {
		printConfigErrors(stderr, *path, err)
		return 2
	}
	ups := cfg.Upstreams
	if len(names) == 1 {
		i := upstreamIndex(ups, names[0])
		if i < 0 {
			fmt.Fprintf(stderr, "smarthost check-upstream: no upstream %q in %s; configured: %s\n",
				names[0], cfg.Path, strings.Join(upstreamNames(ups), ", "))
			return 2
		}
		ups = ups[i : i+1]
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	// Upstreams are checked at once, so that several unreachable ones
	// cost one timeout, and reported in the configuration's order.
	reports := make([]upstream.CheckReport, len(ups))
	var wg sync.WaitGroup
	for i, up := range ups {
		wg.Go(func() {
			reports[i] = upstream.Check(ctx, up, upstream.CheckOptions{
				Hostname:  cfg.Hostname,
				Timeout:   *timeout,
				Sender:    *from,
				Recipient: *to,
				Provider:  cfg.UpstreamProviders[up.Name],
			})
		})
	}
	wg.Wait()

	code := 0
	for _, r := range reports {
		if r.Verdict != upstream.VerdictOK {
			code = 1
		}
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(reports); err != nil {
			fmt.Fprintf(stderr, "smarthost check-upstream: %v\n", err)
			return 1
		}
		return code
	}
	for i, r := range reports {
		if i > 0 {
			fmt.Fprintln(stdout)
		}
		printCheckReport(stdout, r)
	}
	return code
}

// printCheckReport writes one upstream's report, one step a line.
func printCheckReport(w io.Writer, r upstream.CheckReport) {
	fmt.Fprintf(w, "upstream %q (%s, tls %s)\n", r.Upstream, r.Address, r.TLSMode)
	line := func(label, text string) { fmt.Fprintf(w, "  %-9s %s\n", label, text) }
	for _, s := range r.Steps {
		label := s.Name
		if l, ok := stepLabels[s.Name]; ok {
			label = l
		}
		switch s.Result {
		case upstream.StepOK:
			line(label, s.Detail)
		case upstream.StepSkipped:
			line(label, "(skipped: "+s.Detail+skipHint(s.Name)+")")
		default:
			line(label, "FAILED: "+s.Detail)
		}
	}
	if r.Verdict == upstream.VerdictOK {
		line("verdict", "OK")
		return
	}
	line("verdict", "FAIL: "+r.Problem)
	if r.Fix != "" {
		line("fix", r.Fix)
	}
}

// skipHint names the flag that would have made a skipped step run.
func skipHint(step string) string {
	switch step {
	case upstream.StepMail:
		return "; give one with -from"
	case upstream.StepRcpt:
		return "; give one with -to"
	}
	return ""
}

func upstreamIndex(ups []upstream.Upstream, name string) int {
	for i, u := range ups {
		if u.Name == name {
			return i
		}
	}
	return -1
}
