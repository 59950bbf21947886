package main

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
	"strconv"
	"strings"
	"time"
)

// SeqHeader numbers the messages of a run from 1, so that a receiver can
// count them and spot gaps or duplicates.
const SeqHeader = "X-Smtpload-Seq"

// RunHeader carries the random ID of the run, shared by all its messages.
const RunHeader = "X-Smtpload-Run"

// dateLayout is RFC 5322 section 3.3 with a two-digit day, so that every
// Date: header has the same length.
const dateLayout = "Mon, 02 Jan 2006 15:04:05 -0700"

// messages builds the messages of one run. The headers differ per message
// but always have the same length, so one body, built once and shared
// read-only by every session, brings each message to exactly the
// requested size.
type messages struct {
	from   string
	domain string // right-hand side of Message-IDs
	runID  string
	total  int
	width  int    // digits of the sequence number, zero-padded
	body   []byte // CRLF lines of at most 78 characters (RFC 5322 section 2.1.1)
}

func newMessages(cfg Config, runID string) *messages {
	_, domain, _ := strings.Cut(cfg.From, "@")
	m := &messages{
		from:   cfg.From,
		domain: domain,
		runID:  runID,
		total:  cfg.Messages,
		width:  len(strconv.Itoa(cfg.Messages)),
	}
	hdr := len(m.header(1, time.Unix(0, 0)))
	// The empty line that ends the header section is part of the header;
	// a body needs at least one line.
	m.body = textBody(max(int(cfg.Size)-hdr, 2))
	return m
}

// header is the header section of message seq, ending with the empty line.
func (m *messages) header(seq int, now time.Time) []byte {
	n := fmt.Sprintf("%0*d", m.width, seq)
	var b strings.Builder
	fmt.Fprintf(&b, "From: <%s>\r\n", m.from)
	// Recipients are only in the envelope, as in bulk mail; this keeps the
	// header length independent of -to.
	b.WriteString("To: undisclosed-recipients:;\r\n")
	fmt.Fprintf(&b, "Subject: smtpload message %s of %d\r\n", n, m.total)
	fmt.Fprintf(&b, "Date: %s\r\n", now.Format(dateLayout))
	fmt.Fprintf(&b, "Message-ID: <%s.%s@%s>\r\n", n, m.runID, m.domain)
	fmt.Fprintf(&b, "%s: %s\r\n", SeqHeader, n)
	fmt.Fprintf(&b, "%s: %s\r\n", RunHeader, m.runID)
	b.WriteString("MIME-Version: 1.0\r\n")
	b.WriteString("Content-Type: text/plain; charset=us-ascii\r\n")
	b.WriteString("\r\n")
	return []byte(b.String())
}

// size is the length of every message.
func (m *messages) size() int {
	return len(m.header(1, time.Unix(0, 0))) + len(m.body)
}

// newRunID is 8 random bytes in hex: Message-IDs stay unique across runs.
func newRunID() string {
	var b [8]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand documents it)
	return hex.EncodeToString(b[:])
}

// words make the body look like text, so that compression and content
// filters on the way see something like real mail.
var words = strings.Fields(`the of and to in is that for it as with was on be by
at this are from or have an they which one you were her all she there would
their we him been has when who will more no if out so said what up its about
into than them can only other new some could time these two may then do first
any my now such like our over man me even most made after also did many before
must through back years where much your way well down should because each just
those people how too little state good very make world still own see men work
long get here between both life being under never day same another know while
last might us great old year off come since against go came right used take
three delivery message queue report invoice order account shipment customer
payment reminder summary weekly monthly service status update notice`)

// textBody is n bytes of text in CRLF-terminated lines of at most 78
// characters. n must be at least 2.
func textBody(n int) []byte {
	// A fixed seed: the same size gives the same body, run after run.
	rng := mrand.New(mrand.NewPCG(1, 2))
	b := make([]byte, 0, n)
	for {
		rest := n - len(b)
		if rest <= 80 {
			// The last line takes exactly what is left, CRLF included.
			b = appendText(b, rest-2, rng, true)
			return append(b, '\r', '\n')
		}
		// rest > 80 and a line takes at most 78: more than 2 bytes remain
		// for the last line.
		b = appendText(b, 40+rng.IntN(37), rng, false)
		b = append(b, '\r', '\n')
	}
}

// appendText appends words up to limit characters; with exact it fills
// the limit completely, cutting the last word.
func appendText(b []byte, limit int, rng *mrand.Rand, exact bool) []byte {
	used := 0
	for used < limit {
		w := words[rng.IntN(len(words))]
		sep := 0
		if used > 0 {
			sep = 1
		}
		if used+sep+len(w) > limit {
			if !exact {
				break
			}
			room := limit - used
			if sep == 1 {
				if room == 1 {
					// Not a trailing space, which transports may strip.
					return append(b, '.')
				}
				b = append(b, ' ')
				room--
			}
			return append(b, w[:room]...)
		}
		if sep == 1 {
			b = append(b, ' ')
		}
		b = append(b, w...)
		used += sep + len(w)
	}
	return b
}
