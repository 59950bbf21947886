package relay

import (
	"bytes"
	"io"
	"math"
	"strings"
	"testing"

	"smarthost/internal/mailproto"
)

// foldASCII lower-cases ASCII letters only and keeps every other byte as
// it is, so that two different invalid UTF-8 bytes never compare equal.
func foldASCII(s string) string {
	b := []byte(s)
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			b[i] = c + 'a' - 'A'
		}
	}
	return string(b)
}

func FuzzSenderAllowed(f *testing.F) {
	f.Fuzz(func(t *testing.T, pattern, addr string) {
		got := SenderAllowed([]string{pattern}, addr)
		la, lp := foldASCII(addr), foldASCII(pattern)
		var want bool
		switch {
		case pattern == "*":
			want = true
		case addr == "":
			want = false
		case strings.HasPrefix(lp, "*@"):
			at := strings.LastIndexByte(la, '@')
			want = at >= 0 && at < len(la)-1 && la[at+1:] == lp[2:]
		default:
			want = la == lp
		}
		if got != want {
			t.Errorf("SenderAllowed([%q], %q) = %v, want %v", pattern, addr, got, want)
		}
		if SenderAllowed(nil, addr) {
			t.Errorf("SenderAllowed(nil, %q) = true", addr)
		}
		_ = mailproto.DomainOf(addr)
	})
}

func FuzzValidPath(f *testing.F) {
	f.Fuzz(func(t *testing.T, addr string) {
		if !validPath(addr) {
			return
		}
		if strings.ContainsAny(addr, "\r\n\x00 <>\t\x7f") {
			t.Errorf("validPath(%q) = true with a control character, space or angle bracket", addr)
		}
		for _, r := range addr {
			if r >= 0x7f {
				t.Errorf("validPath(%q) = true with non-ASCII %q", addr, r)
			}
		}
		at := strings.LastIndexByte(addr, '@')
		if at <= 0 || at == len(addr)-1 || len(addr) > 320 {
			t.Errorf("validPath(%q) = true without a local part and a domain", addr)
		}
		if mailproto.DomainOf(addr) == "" {
			t.Errorf("validPath(%q) = true but DomainOf is empty", addr)
		}
		if strings.Count(addr, "@") != 1 {
			t.Errorf("validPath(%q) = true with an @ in the local part", addr)
		}
	})
}

// chunkReader returns at most n bytes per Read, so that a CR and its LF
// may arrive in different reads.
type chunkReader struct {
	data []byte
	n    int
}

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.data) == 0 {
		return 0, io.EOF
	}
	n := min(r.n, len(p), len(r.data))
	copy(p, r.data[:n])
	r.data = r.data[n:]
	return n, nil
}

// readNormalized reads a whole message through a normalizer, in the
// buffer layout of the door. The result starts after headroom unused bytes
// and ends with CRLF.
func readNormalized(r io.Reader, sizeHint int) ([]byte, error) {
	out := make([]byte, headroom, headroom+sizeHint+sizeHint/32+64)
	out, err := newNormalizer(r).fill(out, math.MaxInt)
	if err != nil {
		return nil, err
	}
	return out, nil
}

// normalizeReference is readNormalized written the obvious way: every
// CRLF, bare CR and bare LF is one line ending, written as CRLF; NUL bytes
// are dropped after that, so "\r\x00\n" is two line endings; and a last
// line without one gets one.
func normalizeReference(in []byte) []byte {
	s := strings.ReplaceAll(string(in), "\r\n", "\n")
	s = strings.ReplaceAll(s, "\r", "\n")
	s = strings.ReplaceAll(s, "\n", "\r\n")
	s = strings.ReplaceAll(s, "\x00", "")
	if s != "" && !strings.HasSuffix(s, "\r\n") {
		s += "\r\n"
	}
	return []byte(s)
}

func FuzzReadNormalized(f *testing.F) {
	f.Fuzz(func(t *testing.T, in []byte, chunk uint16, hint uint16) {
		n := int(chunk)%64 + 1
		if chunk >= 32<<10 {
			n = int(chunk) // whole reads as large as readNormalized's buffer
		}
		buf, err := readNormalized(&chunkReader{data: bytes.Clone(in), n: n}, int(hint))
		if err != nil {
			t.Fatal(err)
		}
		if len(buf) < headroom {
			t.Fatalf("result of %d bytes is shorter than the headroom", len(buf))
		}
		out := buf[headroom:]
		for i, c := range out {
			if c == '\r' && (i+1 == len(out) || out[i+1] != '\n') {
				t.Fatalf("bare CR at %d in %q", i, out)
			}
			if c == '\n' && (i == 0 || out[i-1] != '\r') {
				t.Fatalf("bare LF at %d in %q", i, out)
			}
		}
		if bytes.IndexByte(out, 0) >= 0 {
			t.Fatalf("NUL left in %q", out)
		}
		if len(out) > 0 && !bytes.HasSuffix(out, []byte("\r\n")) {
			t.Fatalf("%q does not end with CRLF", out)
		}
		want := normalizeReference(in)
		if !bytes.Equal(out, want) {
			t.Fatalf("readNormalized(%q) = %q, want %q", in, out, want)
		}

		// As the door reads a message it spools: pieces of about limit
		// bytes, which together are the same.
		limit := int(hint)%(2*readChunk) + 1
		norm := newNormalizer(&chunkReader{data: bytes.Clone(in), n: n})
		var got, piece []byte
		for !norm.eof {
			if piece, err = norm.fill(piece[:0], limit); err != nil {
				t.Fatal(err)
			}
			if len(piece) > 2*limit+2 {
				t.Fatalf("a piece of %d bytes with limit %d", len(piece), limit)
			}
			got = append(got, piece...)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("in pieces of %d, %q became %q, want %q", limit, in, got, want)
		}
	})
}

func FuzzHeader(f *testing.F) {
	f.Fuzz(func(t *testing.T, raw []byte) {
		// Raw bytes first: HeaderEnd must stay in bounds on anything.
		checkHeaderEnd(t, raw)
		// Then as the door sees a message: normalised.
		buf, err := readNormalized(bytes.NewReader(raw), len(raw))
		if err != nil {
			t.Fatal(err)
		}
		msg := buf[headroom:]
		end, _ := checkHeaderEnd(t, msg)
		h, err := parseHeader(msg[:end])
		if err != nil {
			return
		}
		if h.fromCount < 0 || h.received < 0 {
			t.Fatalf("counts %+v", h)
		}
		// The door's From: extraction.
		if h.fromCount == 1 && h.fromErr == nil {
			if len(h.from) == 0 {
				t.Fatalf("one From: parsed without error into no address")
			}
			for _, a := range h.from {
				if a == nil {
					t.Fatalf("nil address in From:")
				}
				if strings.ContainsAny(a.Address, "\r\n") {
					t.Errorf("From: address %q spans lines", a.Address)
				}
				_ = SenderAllowed([]string{"*@example.com", a.Address}, a.Address)
			}
			_ = mailproto.DomainOf(h.from[0].Address)
		}
		if strings.ContainsAny(h.messageID, "\r\n") {
			t.Errorf("Message-ID %q spans lines", h.messageID)
		}
	})
}

// checkHeaderEnd runs mailproto.HeaderEnd on msg and checks that its result is in
// bounds and on a line boundary.
func checkHeaderEnd(t *testing.T, msg []byte) (int, bool) {
	t.Helper()
	end, blank := mailproto.HeaderEnd(msg)
	if end < 0 || end > len(msg) {
		t.Fatalf("headerEnd = %d, out of [0, %d]", end, len(msg))
	}
	if end > 0 && !bytes.HasSuffix(msg[:end], []byte("\r\n")) {
		t.Fatalf("headerEnd = %d, not after a CRLF in %q", end, msg)
	}
	if blank && !bytes.HasPrefix(msg[end:], []byte("\r\n")) {
		t.Fatalf("headerEnd = %d, blank, but no empty line follows in %q", end, msg)
	}
	if end > 0 && (msg[0] == ' ' || msg[0] == '\t') {
		t.Fatalf("headerEnd = %d on a message that starts with a continuation line", end)
	}
	return end, blank
}
