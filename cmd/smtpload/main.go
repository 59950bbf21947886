// Command smtpload is an SMTP load generator: it sends many messages to a
// submission server over concurrent sessions and reports how many were
// accepted, the replies of those that were not, throughput and latency
// percentiles. It sizes a smarthost deployment and drives its benchmarks.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"
)

const usage = `smtpload — an SMTP load generator

Sends messages to an SMTP submission server over concurrent sessions, then
reports how many were accepted (250), how many were refused (by reply code),
connection errors, throughput, and latency percentiles.

Usage: smtpload [flags]

Flags [default]:
  -addr host:port   server to load [127.0.0.1:587]
  -c N              concurrent sessions [10]
  -n M              messages in total, spread evenly over the sessions [1000]
  -size S           size of each message, headers included: B, KB or MB,
                    from 512B to 256MB [10KB]
  -per-conn K       messages per connection: 0 keeps one connection for all of
                    a session's messages, 1 opens a connection per message [0]
  -tls MODE         none, starttls, or implicit (TLS from the first byte, as
                    on port 465) [none]
  -ca FILE          PEM certificates to trust besides the system roots [none]
  -insecure         do not verify the server certificate, for self-signed
                    test relays [false]
  -user NAME        authenticate as NAME (AUTH PLAIN, else LOGIN) [no AUTH]
  -pass-env VAR     environment variable holding the password [SMTPLOAD_PASSWORD]
  -pass-file FILE   file holding the password, instead of -pass-env [none]
  -from ADDR        envelope sender and From: header [smtpload@example.com]
  -to ADDR          recipient of every message; repeat the flag or separate
                    with commas [sink@example.com]
  -helo NAME        EHLO name [localhost]
  -timeout D        limit for each SMTP command, and for setting up a
                    connection (TCP, TLS, EHLO, AUTH) [30s]
  -rate R           cap on messages per second over all sessions; 0 = none [0]
  -json             print the result as JSON [false]
  -h                print this help

Each message has a unique Message-ID and an X-Smtpload-Seq header (1 to n)
so that the receiving side can count. Latency runs from MAIL FROM to the 250
after DATA. The password is never a flag value.

Exit status: 0 when every message got 250, 1 when any did not, 2 on bad
usage. Ctrl-C stops after the transactions in progress and prints what was
done; a second ctrl-C quits at once.

Examples:
  # 10000 messages of 50KB over 20 sessions to a STARTTLS relay, as user "app"
  SMTPLOAD_PASSWORD=secret smtpload -addr relay.example.com:587 -tls starttls \
      -user app -from app@example.com -to sink@example.net -c 20 -n 10000 -size 50KB

  # one connection per message, at most 100 messages per second, against a
  # self-signed test relay on port 465, result as JSON
  smtpload -addr 127.0.0.1:465 -tls implicit -insecure -per-conn 1 -rate 100 -json
`

func main() {
	ctx, cancel := context.WithCancel(context.Background())
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		// The default action is back for a second signal: it quits at once.
		signal.Reset(os.Interrupt, syscall.SIGTERM)
		fmt.Fprintln(os.Stderr, "smtpload: interrupted; finishing the transactions in progress (ctrl-C again to quit now)")
		cancel()
	}()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr, os.Getenv))
}

// run is the whole command; it returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer, getenv func(string) string) int {
	cfg, err := ParseFlags(args, getenv)
	if errors.Is(err, flag.ErrHelp) {
		fmt.Fprint(stdout, usage)
		return 0
	}
	if err != nil {
		fmt.Fprintf(stderr, "smtpload: %v (smtpload -h for help)\n", err)
		return 2
	}
	if cfg.Insecure {
		fmt.Fprintln(stderr, "smtpload: warning: -insecure: the server certificate is not verified")
	}
	if cfg.User != "" && cfg.TLS == TLSNone && !isLoopback(cfg.Addr) {
		fmt.Fprintln(stderr, "smtpload: warning: -tls none: the password crosses the network unencrypted")
	}

	res, runErr := Run(ctx, cfg)
	if cfg.JSON {
		err = res.WriteJSON(stdout)
	} else {
		err = res.WriteText(stdout)
	}
	if err != nil {
		fmt.Fprintf(stderr, "smtpload: %v\n", err)
		return 1
	}
	if runErr != nil {
		fmt.Fprintf(stderr, "smtpload: stopped: %v\n", runErr)
		return 1
	}
	if !res.OK() {
		return 1
	}
	return 0
}

// isLoopback reports whether addr names this machine.
func isLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
