package main

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestMessagesHaveExactSizeAndShortLines(t *testing.T) {
	for _, size := range []int64{512, 513, 600, 1000, 4 << 10, 10 << 10, 1<<20 + 3} {
		for _, from := range []string{"a@b.example", "a-long-sender-name@notify.subdomain.example.com"} {
			t.Run(fmt.Sprintf("%d/%s", size, from), func(t *testing.T) {
				cfg := DefaultConfig()
				cfg.Size = size
				cfg.From = from
				cfg.Messages = 12345
				m := newMessages(cfg, "0123456789abcdef")
				if got := m.size(); int64(got) != size {
					t.Fatalf("size %d, want %d", got, size)
				}
				first := m.header(1, time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
				last := m.header(12345, time.Date(2026, 12, 31, 23, 59, 59, 0, time.FixedZone("", -9*3600)))
				if len(first) != len(last) {
					t.Errorf("header lengths %d and %d differ", len(first), len(last))
				}
				checkLines(t, append(first, m.body...))
				checkLines(t, append(last, m.body...))
				if !bytes.Contains(last, []byte("\r\n"+SeqHeader+": 12345\r\n")) ||
					!bytes.Contains(first, []byte("\r\n"+SeqHeader+": 00001\r\n")) {
					t.Errorf("sequence headers missing:\n%s\n%s", first, last)
				}
			})
		}
	}
}

// checkLines checks CRLF line endings, no bare CR or LF, and lines of at
// most 78 characters (RFC 5322 section 2.1.1).
func checkLines(t *testing.T, msg []byte) {
	t.Helper()
	if !bytes.HasSuffix(msg, []byte("\r\n")) {
		t.Fatalf("message does not end with CRLF")
	}
	lines := strings.Split(strings.TrimSuffix(string(msg), "\r\n"), "\r\n")
	for i, l := range lines {
		if strings.ContainsAny(l, "\r\n") {
			t.Fatalf("line %d has a bare CR or LF: %q", i+1, l)
		}
		if len(l) > 78 {
			t.Fatalf("line %d has %d characters: %q", i+1, len(l), l)
		}
		if strings.HasSuffix(l, " ") {
			t.Fatalf("line %d ends with a space: %q", i+1, l)
		}
	}
	if len(lines) < 10 {
		t.Fatalf("only %d lines", len(lines))
	}
}

func TestTextBodyLooksLikeText(t *testing.T) {
	for n := 2; n < 400; n++ {
		b := textBody(n)
		if len(b) != n || !bytes.HasSuffix(b, []byte("\r\n")) {
			t.Fatalf("textBody(%d) has %d bytes: %q", n, len(b), b)
		}
	}
	b := string(textBody(10 << 10))
	if w := len(strings.Fields(b)); w < 1000 {
		t.Errorf("10KB of text has only %d words", w)
	}
	if b != string(textBody(10<<10)) {
		t.Errorf("the body changes from run to run")
	}
}

func TestRunIDsDiffer(t *testing.T) {
	a, b := newRunID(), newRunID()
	if a == b || len(a) != 16 {
		t.Errorf("run IDs %q and %q", a, b)
	}
}
