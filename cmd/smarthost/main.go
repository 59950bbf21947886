// Command smarthost is an outbound-only mail submission relay: it accepts
// mail from applications over authenticated SMTP, queues it durably and
// delivers it through upstream providers.
package main

import (
	"fmt"
	"io"
	"os"
	"runtime/debug"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = ""

const usage = `smarthost — an outbound-only mail submission relay

Usage:
  smarthost serve [-config PATH]        run the relay
  smarthost demo [-listen ADDR] [-http ADDR] [-dir DIR]
                                        run a self-contained demo on loopback
  smarthost check-config [-config PATH] validate a configuration, list every problem
  smarthost check-upstream [-config PATH] [-from ADDR] [-to ADDR] [-timeout 15s] [-json] [NAME]
                                        connect to the upstreams, log in, try MAIL FROM/RCPT TO
                                        without sending; say what is wrong and how to fix it
  smarthost passwd [-cost N]            read a password, print its bcrypt hash
  smarthost dkim keygen -domain D -selector S [-algo rsa|ed25519] [-bits 2048] -out FILE [-force]
                                        write a DKIM key, print the DNS TXT record to publish
  smarthost dkim check -domain D -selector S -key FILE [-record "v=DKIM1; …"]
                                        tell whether the published record matches the key
  smarthost queue [-server URL] [-config PATH] [-json] list|show ID|retry ID|hold ID|release ID|delete ID|flush
                                        inspect and manage the running server's queue
  smarthost queue salvage -path FILE -out NEWFILE
                                        copy what can still be read of a damaged queue file into a new one
  smarthost version                     print the version

The configuration path defaults to $SMARTHOST_CONFIG, else /etc/smarthost/config.toml.
`

func main() {
	os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr))
}

func run(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "serve":
		return runServe(args[1:], stdout, stderr)
	case "demo":
		return runDemo(args[1:], stdout, stderr)
	case "check-config":
		return runCheckConfig(args[1:], stdout, stderr)
	case "check-upstream":
		return runCheckUpstream(args[1:], stdout, stderr)
	case "passwd":
		return runPasswd(args[1:], stdin, stdout, stderr)
	case "dkim":
		return runDKIM(args[1:], stdout, stderr)
	case "queue":
		return runQueue(args[1:], stdout, stderr)
	case "version", "-version", "--version":
		fmt.Fprintln(stdout, "smarthost", buildVersion())
		return 0
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "smarthost: unknown command %q\n\n%s", args[0], usage)
	return 2
}

func buildVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "devel"
}

// defaultConfigPath is $SMARTHOST_CONFIG, else the packaged location.
func defaultConfigPath() string {
	if p := os.Getenv("SMARTHOST_CONFIG"); p != "" {
		return p
	}
	return "/etc/smarthost/config.toml"
}
