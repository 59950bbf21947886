package main

import (
	"context"
	"errors"
	"io"
	"sync/atomic"
	"testing"
	"time"
)

func TestParseMesg(t *testing.T) {
	tests := []struct {
		rec  string
		want int
		ok   bool
	}{
		{"sess=0 quit=0 mesg=1", 1, true},
		{"sess=154 quit=149 mesg=200", 200, true},
		{"sess=3 quit=3", 0, false},
		{"mesg=x", 0, false},
		{"", 0, false},
	}
	for _, tt := range tests {
		got, ok := parseMesg([]byte(tt.rec))
		if got != tt.want || ok != tt.ok {
			t.Errorf("parseMesg(%q) = %d, %v; want %d, %v", tt.rec, got, ok, tt.want, tt.ok)
		}
	}
}

// The counter reads smtp-sink's '\r'-ended records as they stream, and
// stamps the count with the time it was read.
func TestCounterStreams(t *testing.T) {
	pr, pw := io.Pipe()
	c := NewCounter()
	var tick atomic.Int64
	clock := func() time.Time { return time.Unix(tick.Add(1), 0) }
	go c.Run(pr, clock)

	got := make(chan time.Time, 1)
	go func() {
		at, err := c.WaitFor(context.Background(), 3)
		if err != nil {
			t.Error(err)
		}
		got <- at
	}()
	// Records split across writes, a session-end record that repeats a
	// count, and the count reached.
	for _, w := range []string{"sess=0 quit=0 mes", "g=1\rsess=0 quit=0 mesg=2\r", "sess=1 quit=1 mesg=2\r", "sess=1 quit=1 mesg=3\r"} {
		if _, err := pw.Write([]byte(w)); err != nil {
			t.Fatal(err)
		}
	}
	select {
	case at := <-got:
		if at.Unix() != 4 { // the fourth record read
			t.Errorf("count 3 stamped at %d, want the fourth read (4)", at.Unix())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WaitFor(3) did not return after mesg=3")
	}
	if n := c.Count(); n != 3 {
		t.Errorf("Count = %d, want 3", n)
	}

	// A wait that cannot be met ends with its context, telling the count.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.WaitFor(ctx, 10); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("WaitFor(10) = %v, want deadline exceeded", err)
	}

	// When smtp-sink's output ends, waiting for more fails at once.
	pw.Close()
	done := make(chan error, 1)
	go func() {
		_, err := c.WaitFor(context.Background(), 10)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, errSinkEnded) {
			t.Errorf("WaitFor after EOF = %v, want errSinkEnded", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WaitFor did not notice the end of the stream")
	}
}
