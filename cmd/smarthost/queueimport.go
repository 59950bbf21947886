package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"path/filepath"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/queue"
)

// runImport is `smarthost queue import`: every message of a stopped
// relay's queue file into the configured queue, read through salvage's
// checked reader, so that a damaged file loses only what is damaged.
func runImport(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("queue import", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() { fmt.Fprint(stderr, queueUsage) }
	from := fs.String("from", "", "the queue file to copy, only read")
	configPath := fs.String("config", defaultConfigPath(), "configuration file naming the queue to copy into (env SMARTHOST_CONFIG)")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	switch {
	case *from == "":
		fmt.Fprintln(stderr, "smarthost queue import: -from FILE is required")
		return 2
	case fs.NArg() > 0:
		fmt.Fprintf(stderr, "smarthost queue import: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	cfg, err := config.Load(*configPath)
	if err != nil {
		printConfigErrors(stderr, *configPath, err)
		return 1
	}
	src, err := filepath.Abs(*from)
	if err != nil {
		fmt.Fprintln(stderr, "smarthost queue import:", err)
		return 2
	}
	if dst, err := filepath.Abs(cfg.Queue.Path); err == nil && dst == src && cfg.Queue.Backend == config.QueueBbolt {
		fmt.Fprintf(stderr, "smarthost queue import: %s is the configured queue itself\n", src)
		return 2
	}

	file, err := queue.OpenSalvage(src)
	if err != nil {
		if errors.Is(err, queue.ErrLocked) {
			err = fmt.Errorf("%s is in use by a running relay: stop it first", src)
		}
		fmt.Fprintln(stderr, "smarthost queue import:", err)
		return 1
	}
	defer file.Close()
	dst, err := openQueue(cfg, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		if errors.Is(err, queue.ErrLocked) {
			err = fmt.Errorf("the configured queue %s is in use by a running relay: stop it first", cfg.Queue.Path)
		}
		fmt.Fprintln(stderr, "smarthost queue import:", err)
		return 1
	}
	rep, err := file.CopyTo(context.Background(), dst)
	if cerr := dst.Close(); err == nil && cerr != nil {
		err = cerr
	}
	if err != nil {
		fmt.Fprintf(stderr, "smarthost queue import: %v\nrun it again: what was copied is not copied twice\n", err)
		return 1
	}
	printImport(stdout, rep, src)
	if len(rep.Lost) > 0 || rep.Unnamed != 0 {
		return 1
	}
	return 0
}

// printImport writes what an import copied, what the queue had already,
// and one line per message that could not be copied.
func printImport(w io.Writer, rep *queue.SalvageReport, from string) {
	for _, d := range rep.Damage {
		fmt.Fprintf(w, "damage: %s\n", printable(d))
	}
	for _, m := range rep.Lost {
		fmt.Fprintf(w, "not copied %s: %s\n", printable(m.ID), printable(m.Reason))
	}
	printUnsure(w, rep.Unsure)
	fmt.Fprintf(w, "copied %d %s from %s", rep.Saved, plural(rep.Saved, "message", "messages"), from)
	if rep.Spooled > 0 || rep.Held > 0 {
		fmt.Fprintf(w, " (%d with a spool file, %d held)", rep.Spooled, rep.Held)
	}
	if rep.Journal > 0 {
		fmt.Fprintf(w, " (%d from the journal)", rep.Journal)
	}
	fmt.Fprintln(w)
	if rep.Present > 0 {
		fmt.Fprintf(w, "%d %s copied before, not copied again\n", rep.Present, plural(rep.Present, "message was", "messages were"))
	}
	if n := len(rep.Lost); n > 0 || rep.Unnamed != 0 {
		fmt.Fprintf(w, "not copied: %d %s listed above; %s is unchanged\n", n, plural(n, "message", "messages"), from)
	}
}
