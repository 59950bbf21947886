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
  smarthost check-config [-config PATH] [-no-secrets]
                                        validate a configuration, list every problem;
                                        -no-secrets reads no password, key, token or DSN (for CI)
  smarthost check-upstream [-config PATH] [-from ADDR] [-to ADDR] [-timeout 15s] [-json] [NAME]
                                        connect to the upstreams, log in, try MAIL FROM/RCPT TO
                                        without sending; say what is wrong and how to fix it;
                                        reads only the upstreams' secrets (NAME's alone if given)
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
	printVersion := func([]string) int {
		fmt.Fprintln(stdout, "smarthost", buildVersion())
		return 0
	}
	return dispatch("smarthost", usage, args, stdout, stderr, map[string]func([]string) int{
		"serve":          func(a []string) int { return runServe(a, stdout, stderr) },
		"demo":           func(a []string) int { return runDemo(a, stdout, stderr) },
		"check-config":   func(a []string) int { return runCheckConfig(a, stdout, stderr) },
		"check-upstream": func(a []string) int { return runCheckUpstream(a, stdout, stderr) },
		"passwd":         func(a []string) int { return runPasswd(a, stdin, stdout, stderr) },
		"dkim":           func(a []string) int { return runDKIM(a, stdout, stderr) },
		"queue":          func(a []string) int { return runQueue(a, stdout, stderr) },
		"version":        printVersion,
		"-version":       printVersion,
		"--version":      printVersion,
	})
}

// dispatch runs the command of cmds that args[0] names with the rest of
// args. It prints usage to stdout for help (exit 0), and to stderr when
// there is no command or an unknown one (exit 2); name starts the
// complaint.
func dispatch(name, usage string, args []string, stdout, stderr io.Writer, cmds map[string]func(args []string) int) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	if cmd, ok := cmds[args[0]]; ok {
		return cmd(args[1:])
	}
	switch args[0] {
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	}
	fmt.Fprintf(stderr, "%s: unknown command %q\n\n%s", name, args[0], usage)
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
