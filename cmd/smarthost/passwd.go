package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"golang.org/x/crypto/bcrypt"
)

// runPasswd implements `smarthost passwd [-cost N]`: it reads a password
// from stdin (the first line; asked twice when stdin is a terminal) and
// prints its bcrypt hash for a [[user]] password_hash.
func runPasswd(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("passwd", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cost := fs.Int("cost", bcrypt.DefaultCost, "bcrypt cost (work factor), 4 to 31")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: smarthost passwd [-cost N] < password-file")
		fmt.Fprintln(stderr, "Reads a password and prints its bcrypt hash for password_hash in [[user]].")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 1
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "smarthost passwd: unexpected argument %q; the password is read from stdin\n", fs.Arg(0))
		return 1
	}
	if *cost < bcrypt.MinCost || *cost > bcrypt.MaxCost {
		fmt.Fprintf(stderr, "smarthost passwd: -cost must be from %d to %d\n", bcrypt.MinCost, bcrypt.MaxCost)
		return 1
	}
	pw, err := readPassword(stdin, stdinIsTerminal(stdin), stderr)
	if err != nil {
		fmt.Fprintf(stderr, "smarthost passwd: %v\n", err)
		return 1
	}
	hash, err := bcrypt.GenerateFromPassword(pw, *cost)
	if err != nil {
		// bcrypt refuses passwords over 72 bytes rather than truncating.
		fmt.Fprintf(stderr, "smarthost passwd: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, string(hash))
	return 0
}

// readPassword reads the first line of r. Interactively it prompts on
// stderr and asks again to catch typos; the terminal still echoes, which
// the prompt says, since the module has no terminal-control dependency.
func readPassword(r io.Reader, interactive bool, stderr io.Writer) ([]byte, error) {
	br := bufio.NewReader(r)
	if !interactive {
		pw, err := readPasswordLine(br)
		if err != nil {
			return nil, err
		}
		return []byte(pw), nil
	}
	fmt.Fprintln(stderr, "Note: the password is shown as you type; pipe it in to avoid that.")
	fmt.Fprint(stderr, "Password: ")
	pw, err := readPasswordLine(br)
	if err != nil {
		return nil, err
	}
	fmt.Fprint(stderr, "Again: ")
	again, err := readPasswordLine(br)
	if err != nil {
		return nil, err
	}
	if pw != again {
		return nil, errors.New("the passwords do not match")
	}
	return []byte(pw), nil
}

// readPasswordLine returns one line without its line ending; leading and trailing
// spaces belong to the password and are kept.
func readPasswordLine(br *bufio.Reader) (string, error) {
	line, err := br.ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("read password: %w", err)
	}
	line = strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
	if line == "" {
		return "", errors.New("empty password")
	}
	return line, nil
}

// stdinIsTerminal reports whether r is a character device such as a terminal.
func stdinIsTerminal(r io.Reader) bool {
	f, ok := r.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}
