package relay

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	msgauthdkim "github.com/emersion/go-msgauth/dkim"

	"smarthost/dkim"
	"smarthost/internal/mailproto"
)

// startPlain runs a Server with one plain-text listener that trusts
// loopback, messages up to 8 MiB, and spoolAfter as the spool threshold
// (0: the default, 1 MiB).
func startPlain(t *testing.T, spoolAfter int, tweak func(*Server)) *testEnv {
	return startServer(t, func(s *Server) {
		s.Listeners = []Listener{{Address: "127.0.0.1:0", TLS: mailproto.TLSNone,
			TrustedNetworks: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}}}
		s.Limits.MaxMessageBytes = 8 << 20
		s.spoolAfter = spoolAfter
		if tweak != nil {
			tweak(s)
		}
	})
}

func dialPlain(t *testing.T, env *testEnv) *client {
	t.Helper()
	c := dial(t, env.addrs[0])
	c.expect(250, "EHLO client.test")
	return c
}

// messyMessage is a message of about size bytes with every kind of line
// ending and NULs, and line endings split at every 32 KiB of input, where
// the door's first reads end. It has no line that starts with a dot, so
// it is sent as it is.
func messyMessage(size int) []byte {
	var b bytes.Buffer
	b.WriteString("From: App <app@example.com>\nTo: bob@example.net\r\nSubject: big\r" +
		"Date: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <big@example.com>\n\n")
	rng := rand.New(rand.NewPCG(7, 7))
	endings := []string{"\r\n", "\n", "\r", "\r\r\n", "\n\r", "\x00\r\n"}
	for b.Len() < size {
		line := make([]byte, rng.IntN(120))
		for i := range line {
			line[i] = 'a' + byte(rng.IntN(26))
			if rng.IntN(200) == 0 {
				line[i] = 0
			}
		}
		b.Write(line)
		b.WriteString(endings[rng.IntN(len(endings))])
	}
	msg := b.Bytes()
	// At the edges of reads: a CRLF split in two, a bare CR, a NUL before
	// an LF, an LF before a CR.
	splits := [][2]byte{{'\r', '\n'}, {'\r', 'x'}, {0, '\n'}, {'\n', '\r'}}
	for k := 1; k*readChunk < len(msg)-1; k++ {
		s := splits[k%len(splits)]
		msg[k*readChunk-1], msg[k*readChunk] = s[0], s[1]
	}
	// Ends without a line ending; the client's CRLF before the dot makes one.
	return append(msg, "last"...)
}

var dkimTag = regexp.MustCompile(`(?m)^DKIM-Signature:[^\r]*(\r\n[ \t][^\r]*)*\r\n`)

// TestSpooledSameAsInMemory sends one 3 MB message to a door that holds it
// in memory, to one that spools it past the default threshold, and to one
// that spools it past 8 KiB: each stores the same bytes (the queue ID
// aside), normalised, with a valid DKIM signature over the same body.
func TestSpooledSameAsInMemory(t *testing.T) {
	_, key, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	keys := []dkim.Key{
		{Domain: "example.com", Selector: "relaxed", Signer: key},
		{Domain: "example.com", Selector: "simple", Signer: key, BodyCanonicalization: "simple", HeaderCanonicalization: "simple"},
	}
	signer, err := dkim.New(keys, nil)
	if err != nil {
		t.Fatal(err)
	}
	record, err := dkim.RecordValue(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 11, 22, 10, 0, 0, 0, time.UTC)
	raw := messyMessage(3 << 20)
	want := normalizeReference(append(bytes.Clone(raw), "\r\n"...))

	type stored struct {
		prefix []byte // signatures and Received:, queue ID replaced
		sigs   []byte
	}
	var results []stored
	for _, tc := range []struct {
		name       string
		spoolAfter int
		spooled    bool
	}{
		{"memory", 16 << 20, false},
		{"default", 0, true},
		{"8KiB", 8 << 10, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			env := startPlain(t, tc.spoolAfter, func(s *Server) {
				s.Signer = signer
				s.Now = func() time.Time { return now }
			})
			c := dialPlain(t, env)
			if code, msg := c.send("app@example.com", []string{"bob@example.net"}, string(raw)+"\r\n"); code != 250 {
				t.Fatalf("%d %s", code, msg)
			}
			got := env.q.all()
			if len(got) != 1 {
				t.Fatalf("%d messages queued", len(got))
			}
			q := got[0]
			if q.spooled != tc.spooled {
				t.Errorf("spooled = %v, want %v", q.spooled, tc.spooled)
			}
			if q.m.Size != int64(len(q.body)) {
				t.Errorf("Size = %d, body %d bytes", q.m.Size, len(q.body))
			}
			if !bytes.HasSuffix(q.body, want) {
				t.Fatalf("stored message does not end with the normalised input")
			}
			vs, err := msgauthdkim.VerifyWithOptions(bytes.NewReader(q.body), &msgauthdkim.VerifyOptions{
				LookupTXT: func(string) ([]string, error) { return []string{record}, nil },
			})
			if err != nil || len(vs) != 2 {
				t.Fatalf("verification: %v, %d signatures", err, len(vs))
			}
			for _, v := range vs {
				if v.Err != nil {
					t.Errorf("signature does not verify: %v", v.Err)
				}
			}
			prefix := q.body[:len(q.body)-len(want)]
			sigs := bytes.Join(dkimTag.FindAll(prefix, -1), nil)
			if len(sigs) == 0 || !bytes.HasPrefix(prefix, sigs) {
				t.Fatalf("no signatures in front of %q", prefix)
			}
			prefix = bytes.ReplaceAll(prefix, []byte(q.m.ID), []byte("QUEUEID"))
			results = append(results, stored{prefix: prefix, sigs: sigs})
			if files := env.q.spoolFiles(t); len(files) != 0 {
				t.Errorf("spool files left: %q", files)
			}
		})
	}
	if len(results) != 3 {
		t.Fatal("not every path stored the message")
	}
	tagT := regexp.MustCompile(`t=[0-9]+`)
	for _, r := range results[1:] {
		base := results[0]
		// go-msgauth stamps t= with its own clock; the rest must match.
		a := tagT.ReplaceAll(base.prefix, []byte("t=T"))
		b := tagT.ReplaceAll(r.prefix, []byte("t=T"))
		if bytes.Equal(tagT.FindAll(base.sigs, -1)[0], tagT.FindAll(r.sigs, -1)[0]) && !bytes.Equal(base.prefix, r.prefix) {
			t.Errorf("signed in the same second, different bytes:\n%s\n%s", base.prefix, r.prefix)
		}
		if bh := regexp.MustCompile(`bh=[^;]+`); !bytes.Equal(bytes.Join(bh.FindAll(base.sigs, -1), nil), bytes.Join(bh.FindAll(r.sigs, -1), nil)) {
			t.Errorf("body hashes differ:\n%s\n%s", base.sigs, r.sigs)
		}
		// Without the signatures (b= depends on t=), the bytes are equal.
		if !bytes.Equal(dkimTag.ReplaceAll(a, nil), dkimTag.ReplaceAll(b, nil)) {
			t.Errorf("stored fields differ:\n%s\n%s", a, b)
		}
	}
}

// TestHeaderSectionTooLarge: a header section that does not end within
// the first 64 KiB is refused with 552 5.3.4, whether the message would be
// held in memory or spooled, and nothing is left behind; one that ends
// just before is accepted, on either path.
func TestHeaderSectionTooLarge(t *testing.T) {
	env := startPlain(t, 0, nil)
	c := dialPlain(t, env)
	fields := func(n int) string {
		var b strings.Builder
		b.WriteString("From: App <app@example.com>\r\n")
		for i := 0; b.Len() < n; i++ {
			fmt.Fprintf(&b, "X-Filler-%d: %s\r\n", i, strings.Repeat("h", 70))
		}
		return b.String()
	}
	large := strings.Repeat(strings.Repeat("b", 76)+"\r\n", 20000) // 1.5 MB: spooled
	small := "A short body.\r\n"

	for _, tc := range []struct{ name, msg string }{
		{"spooled", fields(headerLimit+100) + "\r\n" + large},
		{"in memory", fields(headerLimit+100) + "\r\n" + small},
		{"fields only", fields(headerLimit + 100)},
		{"fields only, over 1 MiB", fields(spoolThreshold + 100)},
	} {
		code, msg := c.send("app@example.com", []string{"bob@example.net"}, tc.msg)
		if code != 552 || msg != "5.3.4 Message header section too large" {
			t.Errorf("%s, header over 64 KiB: %d %s, want 552 5.3.4", tc.name, code, msg)
		}
	}
	if n := len(env.q.all()); n != 0 {
		t.Fatalf("%d messages queued", n)
	}

	// The session goes on; a header that ends within the limit passes.
	hdr := fields(headerLimit - 1000)
	for _, body := range []string{large, small} {
		if code, msg := c.send("app@example.com", []string{"bob@example.net"}, hdr+"\r\n"+body); code != 250 {
			t.Fatalf("header just under 64 KiB: %d %s", code, msg)
		}
	}
	got := env.q.all()
	if len(got) != 2 || !got[0].spooled || got[1].spooled ||
		!bytes.HasSuffix(got[0].body, []byte(hdr+"\r\n"+large)) || !bytes.HasSuffix(got[1].body, []byte(hdr+"\r\n"+small)) {
		t.Errorf("queued %d messages; want the two, the large one spooled, intact", len(got))
	}
	if files := env.q.spoolFiles(t); len(files) != 0 {
		t.Errorf("spool files left: %q", files)
	}
	if n := env.srv.memory.inUse(); n != 0 {
		t.Errorf("%d bytes of message memory still lent out", n)
	}
}

// TestSpoolStorageFailure: whatever fails in storing a spooled message —
// creating the file, writing it (a full disk), committing the record — the
// reply is 452 4.3.1, never 250, no file is left, and the session goes on.
func TestSpoolStorageFailure(t *testing.T) {
	_, key, _ := ed25519.GenerateKey(nil)
	signer, err := dkim.New([]dkim.Key{{Domain: "example.com", Selector: "s", Signer: key}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	env := startPlain(t, 8<<10, func(s *Server) { s.Signer = signer })
	c := dialPlain(t, env)
	msg := "From: App <app@example.com>\r\nSubject: spooled\r\n\r\n" + strings.Repeat(strings.Repeat("z", 76)+"\r\n", 2000)
	full := fmt.Errorf("write spool file: %w", syscall.ENOSPC)
	for _, tc := range []struct {
		name string
		set  func(q *memQueue)
	}{
		{"new spool", func(q *memQueue) { q.spoolFail = full }},
		{"write", func(q *memQueue) { q.brokenSpool = true }},
		{"commit", func(q *memQueue) { q.fail = errors.New("bbolt: commit failed") }},
	} {
		env.q.mu.Lock()
		env.q.spoolFail, env.q.brokenSpool, env.q.fail = nil, false, nil
		tc.set(env.q)
		env.q.mu.Unlock()
		code, text := c.send("app@example.com", []string{"bob@example.net"}, msg)
		if code != 452 || !strings.HasPrefix(text, "4.3.1 ") {
			t.Errorf("%s failure: %d %s, want 452 4.3.1", tc.name, code, text)
		}
		if files := env.q.spoolFiles(t); len(files) != 0 {
			t.Errorf("%s failure: spool files left: %q", tc.name, files)
		}
	}
	env.q.mu.Lock()
	env.q.spoolFail, env.q.brokenSpool, env.q.fail = nil, false, nil
	env.q.mu.Unlock()
	if code, text := c.send("app@example.com", []string{"bob@example.net"}, msg); code != 250 {
		t.Fatalf("after the failures: %d %s", code, text)
	}
	if n := len(env.q.all()); n != 1 {
		t.Errorf("%d messages queued, want the last one", n)
	}
}

// TestSpooledTooLarge: a message that passes the limit after it started
// spooling gets 552 5.3.4, and its file is removed.
func TestSpooledTooLarge(t *testing.T) {
	env := startPlain(t, 8<<10, func(s *Server) { s.Limits.MaxMessageBytes = 200 << 10 })
	c := dialPlain(t, env)
	msg := "From: App <app@example.com>\r\n\r\n" + strings.Repeat(strings.Repeat("y", 76)+"\r\n", 5000)
	if code, text := c.send("app@example.com", []string{"bob@example.net"}, msg); code != 552 || !strings.HasPrefix(text, "5.3.4") {
		t.Errorf("%d %s, want 552 5.3.4", code, text)
	}
	if files := env.q.spoolFiles(t); len(files) != 0 {
		t.Errorf("spool files left: %q", files)
	}
	if n := len(env.q.all()); n != 0 {
		t.Errorf("%d messages queued", n)
	}
}

// TestNormalizerChunked: read in pieces of a small limit, as the door
// spools, the normaliser gives what the reference does, and no piece is
// larger than twice the limit plus the final CRLF.
func TestNormalizerChunked(t *testing.T) {
	raw := messyMessage(100 << 10)
	want := normalizeReference(raw)
	for _, read := range []int{1, 3, 100, readChunk} {
		for _, limit := range []int{1, 5, 4096, readChunk} {
			n := newNormalizer(&chunkReader{data: bytes.Clone(raw), n: read})
			var got []byte
			var piece []byte
			for !n.eof {
				var err error
				piece, err = n.fill(piece[:0], limit)
				if err != nil {
					t.Fatal(err)
				}
				if len(piece) > 2*limit+2 {
					t.Fatalf("reads of %d, limit %d: a piece of %d bytes", read, limit, len(piece))
				}
				got = append(got, piece...)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("reads of %d, limit %d: output differs from the reference", read, limit)
			}
		}
	}
}
