package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/dkim"
)

const dkimUsage = `Usage:
  smarthost dkim keygen -domain D -selector S [-algo rsa|ed25519] [-bits 2048] -out FILE [-force]
        write a new private key (mode 0600) and print the DNS TXT record to publish
  smarthost dkim check -domain D -selector S -key FILE [-record "v=DKIM1; …"]
        tell whether the record published (or given) for S._domainkey.D matches FILE
`

// runDKIM dispatches the dkim subcommands.
func runDKIM(args []string, stdout, stderr io.Writer) int {
	return dispatch("smarthost dkim", dkimUsage, args, stdout, stderr, map[string]func([]string) int{
		"keygen": func(a []string) int { return runDKIMKeygen(a, stdout, stderr) },
		"check":  func(a []string) int { return runDKIMCheck(a, stdout, stderr, net.LookupTXT) },
	})
}

// dkimFlags holds the -domain and -selector flags shared by the dkim
// subcommands; register also sets the usage text.
type dkimFlags struct {
	flags            *flag.FlagSet
	domain, selector string
}

func (d *dkimFlags) register(flags *flag.FlagSet, synopsis string) {
	flags.Usage = func() {
		fmt.Fprintf(flags.Output(), "Usage: smarthost dkim %s %s\n", flags.Name(), synopsis)
		flags.PrintDefaults()
	}
	d.flags = flags
	flags.StringVar(&d.domain, "domain", "", "signing domain (d=), e.g. example.com")
	flags.StringVar(&d.selector, "selector", "", "selector (s=), e.g. s2026")
}

// check validates and normalises the flags and refuses stray arguments;
// the error is a usage error.
func (d *dkimFlags) check() error {
	if d.flags.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", d.flags.Arg(0))
	}
	if d.domain == "" {
		return errors.New("-domain is required")
	}
	if d.selector == "" {
		return errors.New("-selector is required")
	}
	d.domain = strings.ToLower(strings.TrimSuffix(d.domain, "."))
	if !config.ValidDomain(d.domain) {
		return fmt.Errorf("-domain %q is not a domain name", d.domain)
	}
	if !config.ValidDomain(strings.ToLower(d.selector)) {
		return fmt.Errorf("-selector %q is not a valid DNS label sequence", d.selector)
	}
	return nil
}

// usageError prints a usage problem and returns exit code 2.
func usageError(stderr io.Writer, flags *flag.FlagSet, err error) int {
	fmt.Fprintf(stderr, "smarthost dkim %s: %v\n\n", flags.Name(), err)
	flags.Usage()
	return 2
}

func runDKIMKeygen(args []string, stdout, stderr io.Writer) int {
	flags := flag.NewFlagSet("keygen", flag.ContinueOnError)
	flags.SetOutput(stderr)
	var d dkimFlags
	d.register(flags, "-domain D -selector S [-algo rsa|ed25519] [-bits 2048] -out FILE [-force]")
	algo := flags.String("algo", "rsa", "key algorithm: rsa or ed25519")
	bits := flags.Int("bits", 2048, fmt.Sprintf("RSA key size, %d to 8192", dkim.MinRSABits))
	out := flags.String("out", "", "file to write the private key to (PKCS#8 PEM, mode 0600)")
	force := flags.Bool("force", false, "replace -out if it exists")
	if err := flags.Parse(args); err != nil {
		return 2
	}
	err := d.check()
	switch {
	case err != nil:
	case *out == "":
		err = errors.New("-out is required")
	case *algo != "rsa" && *algo != "ed25519":
		err = fmt.Errorf("-algo %q: want rsa or ed25519", *algo)
	case *algo == "rsa" && (*bits < dkim.MinRSABits || *bits > 8192):
		// RFC 8301 section 3.2: signers use at least 1024 bits; 2048
		// is what large receivers expect.
		err = fmt.Errorf("-bits %d: an RSA key has %d to 8192 bits (2048 recommended)", *bits, dkim.MinRSABits)
	case *algo == "ed25519" && flagSet(flags, "bits"):
		err = errors.New("-bits applies to -algo rsa only")
	}
	if err != nil {
		return usageError(stderr, flags, err)
	}
	if !*force {
		// Fail before a slow key generation; the exclusive create below
		// still guards against a file that appears meanwhile.
		if _, err := os.Lstat(*out); err == nil {
			fmt.Fprintf(stderr, "smarthost dkim keygen: %s exists; use -force to replace it\n", *out)
			return 1
		}
	}

	key, err := dkim.GenerateKey(*algo, *bits)
	if err != nil {
		fmt.Fprintln(stderr, "smarthost dkim keygen:", err)
		return 1
	}
	pemData, err := dkim.MarshalKey(key)
	if err != nil {
		fmt.Fprintln(stderr, "smarthost dkim keygen:", err)
		return 1
	}
	zone, err := dkim.ZoneRecord(d.domain, d.selector, key.Public())
	if err != nil {
		fmt.Fprintln(stderr, "smarthost dkim keygen:", err)
		return 1
	}
	if err := writeKeyFile(*out, pemData, *force); err != nil {
		fmt.Fprintln(stderr, "smarthost dkim keygen:", err)
		return 1
	}
	path := *out
	if abs, err := filepath.Abs(path); err == nil {
		path = abs
	}
	desc := *algo
	if *algo == "rsa" {
		desc = fmt.Sprintf("rsa-%d", *bits)
	}
	// Everything on stdout is a valid zone-file fragment: the hints are
	// zone comments, so the output can be pasted or appended as it is.
	fmt.Fprintf(stdout, "; %s key for %s (selector %s) written to %s\n", desc, d.domain, d.selector, path)
	fmt.Fprintf(stdout, "; config: [[dkim]] domain = %q  selector = %q  key_file = %q\n", d.domain, d.selector, path)
	fmt.Fprintln(stdout, zone)
	return 0
}

// writeKeyFile writes a private key with mode 0600. Without force it
// creates the file exclusively, so an existing key is never lost; with
// force it replaces the file atomically (a temporary file in the same
// directory, then rename), so a crash leaves the old key or the new one.
func writeKeyFile(path string, data []byte, force bool) error {
	if !force {
		f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s exists; use -force to replace it", path)
		}
		if err != nil {
			return err
		}
		if err := writeSyncClose(f, data); err != nil {
			os.Remove(path)
			return err
		}
		return nil
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	if err := writeSyncClose(f, data); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return err
	}
	return nil
}

// writeSyncClose writes data to a new key file, sets its mode to exactly
// 0600 whatever the umask, and makes it durable.
func writeSyncClose(f *os.File, data []byte) error {
	_, err := f.Write(data)
	if err == nil {
		err = f.Chmod(0o600)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("write %s: %w", f.Name(), err)
	}
	return nil
}

// runDKIMCheck compares a published (or given) record with a key file.
// lookupTXT is net.LookupTXT outside tests; each string it returns is one
// TXT record with its strings already joined.
func runDKIMCheck(args []string, stdout, stderr io.Writer, lookupTXT func(string) ([]string, error)) int {
	flags := flag.NewFlagSet("check", flag.ContinueOnError)
	flags.SetOutput(stderr)
	var d dkimFlags
	d.register(flags, `-domain D -selector S -key FILE [-record "v=DKIM1; …"]`)
	keyFile := flags.String("key", "", "private key file (PEM)")
	record := flags.String("record", "", "record to check instead of looking it up in DNS: its value, or its quoted strings as in a zone file")
	if err := flags.Parse(args); err != nil {
		return 2
	}
	err := d.check()
	switch {
	case err != nil:
	case *keyFile == "":
		err = errors.New("-key is required")
	}
	if err != nil {
		return usageError(stderr, flags, err)
	}

	key, err := dkim.LoadKey(*keyFile)
	if err != nil {
		fmt.Fprintf(stdout, "ERROR: %s: %v\n", *keyFile, err)
		return 1
	}
	name := dkim.RecordName(d.domain, d.selector)
	var records []string
	if flagSet(flags, "record") {
		records = []string{joinTXTStrings(*record)}
	} else {
		records, err = lookupTXT(name)
		if err != nil {
			fmt.Fprintf(stdout, "ERROR: look up TXT %s: %v\n", name, err)
			return 1
		}
	}
	switch len(records) {
	case 0:
		fmt.Fprintf(stdout, "ERROR: no TXT record at %s\n", name)
		return 1
	case 1:
	default:
		// RFC 6376 section 3.6.2.2 leaves the choice among several
		// records to each verifier: only one record is reliable.
		fmt.Fprintf(stdout, "ERROR: %d TXT records at %s; publish exactly one\n", len(records), name)
		return 1
	}
	// The key and names are already checked, so what fails now is the
	// record: malformed, revoked, or another key's.
	if err := dkim.CheckRecord(d.domain, d.selector, key, records[0]); err != nil {
		// Show the verifier's reason, not CheckRecord's "does not match".
		if cause := errors.Unwrap(err); cause != nil {
			err = cause
		}
		fmt.Fprintf(stdout, "MISMATCH: %s does not match %s: %v\n", name, *keyFile, err)
		return 1
	}
	fmt.Fprintf(stdout, "OK: %s matches %s\n", name, *keyFile)
	return 0
}

// flagSet reports whether the named flag was given on the command line.
func flagSet(flags *flag.FlagSet, name string) bool {
	set := false
	flags.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// joinTXTStrings accepts a record as its plain value or as it appears in
// a zone file, one or more quoted strings (RFC 1035 section 5.1), and
// returns the value with the strings joined as a resolver does. A DKIM
// record never contains a double quote, so any quote means zone syntax.
func joinTXTStrings(s string) string {
	if !strings.Contains(s, `"`) {
		return strings.TrimSpace(s)
	}
	var b strings.Builder
	in := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '"':
			in = !in
		case in && c == '\\' && i+1 < len(s):
			i++
			b.WriteByte(s[i])
		case in:
			b.WriteByte(c)
		}
	}
	return b.String()
}
