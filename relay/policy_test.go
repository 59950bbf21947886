package relay

import (
	"io"
	"testing"
)

func TestSenderAllowed(t *testing.T) {
	patterns := []string{"billing@example.com", "*@Notify.Example.com"}
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"billing@example.com", true},
		{"BILLING@EXAMPLE.COM", true},
		{"alerts@notify.example.com", true},
		{"x@sub.notify.example.com", false},
		{"billing@example.com.evil.test", false},
		{"ceo@example.com", false},
		{"notify.example.com", false},
		{"", false},
	} {
		if got := SenderAllowed(patterns, tc.addr); got != tc.want {
			t.Errorf("SenderAllowed(%q) = %v, want %v", tc.addr, got, tc.want)
		}
	}
	if !SenderAllowed([]string{"*"}, "") || !SenderAllowed([]string{"*"}, "any@where.test") {
		t.Error(`"*" does not allow every sender`)
	}
}

func TestValidPath(t *testing.T) {
	for _, tc := range []struct {
		addr string
		want bool
	}{
		{"bob@example.net", true},
		{"bob+tag@[127.0.0.1]", true},
		{"bob", false},
		{"@example.net", false},
		{"bob@", false},
		{"bob smith@example.net", false},
		{"bob\r\nX-Injected: 1@example.net", false},
		{"bob\x00@example.net", false},
		{"bob>@example.net", false},
		{"josé@example.net", false},
	} {
		if got := validPath(tc.addr); got != tc.want {
			t.Errorf("validPath(%q) = %v, want %v", tc.addr, got, tc.want)
		}
	}
}

func TestReadNormalized(t *testing.T) {
	for in, want := range map[string]string{
		"a\r\nb\r\n":  "a\r\nb\r\n",
		"a\nb\n":      "a\r\nb\r\n",
		"a\rb\r":      "a\r\nb\r\n",
		"a\r\r\nb":    "a\r\n\r\nb\r\n",
		"a\n\rb":      "a\r\n\r\nb\r\n",
		"no newline":  "no newline\r\n",
		"":            "",
		"\n.\n":       "\r\n.\r\n",
		"x\r\n.\ny\r": "x\r\n.\r\ny\r\n",
	} {
		got, err := readNormalized(&oneByteReader{s: in}, 0)
		if err != nil {
			t.Fatal(err)
		}
		if string(got[headroom:]) != want {
			t.Errorf("readNormalized(%q) = %q, want %q", in, got[headroom:], want)
		}
	}
}

// oneByteReader returns its input a byte at a time, so that a CR and its
// LF arrive in different reads.
type oneByteReader struct{ s string }

func (r *oneByteReader) Read(p []byte) (int, error) {
	if r.s == "" {
		return 0, io.EOF
	}
	p[0] = r.s[0]
	r.s = r.s[1:]
	return 1, nil
}
