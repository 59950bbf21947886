package relay

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/mail"
	"net/textproto"
	"strings"
	"time"

	"smarthost/internal/mailproto"
)

// headroom is reserved in front of a message read at the door, so that the
// header fields added there (Received:, Message-ID:, Date:, DKIM-Signature:)
// are prepended without copying the message.
const headroom = 8 << 10

// maxReceived is the hop count past which a message is taken for a loop
// (RFC 5321 section 6.3; Postfix's hopcount_limit).
const maxReceived = 50

// spoolThreshold is the most of a message the door holds in memory, and
// then only with bytes lent by the relay's message memory budget (see
// memory.go). A larger message, or one that gets no loan, goes on to a
// spool file in chunks as it arrives.
const spoolThreshold = 1 << 20

// headerLimit is how far into a message its header section must end
// (552 5.3.4 otherwise), and so the memory a session in DATA holds
// without a loan: the header section is parsed and signed in memory.
// Postfix's header_size_limit is 100 KiB (it moves the excess to the
// body), sendmail's 32 KiB; real mail needs a few KiB, long recipient
// lists and ARC chains tens.
const headerLimit = 64 << 10

// readChunk is the size of one read from the client, that of go-smtp's
// own buffer. Normalising at most doubles it (a bare LF becomes CRLF), so
// a spool write is at most 8 KiB: a spooling session holds its header
// section and these two buffers.
const readChunk = 4 << 10

// normalizer reads a message and converts every line ending to CRLF: a
// bare LF or a bare CR becomes CRLF. A message stored this way cannot carry
// an end-of-data sequence to the upstream other than the one the upstream
// client writes itself (SMTP smuggling, CVE-2023-51764 and relatives). NUL
// bytes are dropped: RFC 5322 section 4.1 keeps them only as obsolete
// syntax, and an upstream that discards them would read "\r\n\x00.\r\n"
// as the end of data. The message ends with CRLF. It works on a stream in
// pieces of any size: a CR at the end of one read and an LF at the start
// of the next are one line ending.
type normalizer struct {
	r     io.Reader
	chunk []byte
	cr    bool // the previous byte was a CR not yet written
	wrote bool // some byte was written
	last  byte // the last byte written
	eof   bool // r is exhausted and the final CRLF written
}

func newNormalizer(r io.Reader) *normalizer {
	return &normalizer{r: r, chunk: make([]byte, readChunk)}
}

// fill reads from r and appends the normalised bytes to dst until dst
// holds at least limit bytes or the message ends (eof). Each read asks for
// no more than limit−len(dst) bytes, and a byte read becomes at most two,
// plus a CR held from the read before and a final CRLF: dst ends within
// 2·limit − len(dst) + 4 bytes.
func (n *normalizer) fill(dst []byte, limit int) ([]byte, error) {
	for !n.eof && len(dst) < limit {
		k, err := n.r.Read(n.chunk[:min(len(n.chunk), limit-len(dst))])
		dst = n.normalize(dst, n.chunk[:k])
		if err == io.EOF {
			n.eof = true
			if n.cr || (n.wrote && n.last != '\n') {
				dst = append(dst, '\r', '\n')
			}
			break
		}
		if err != nil {
			return dst, err
		}
	}
	return dst, nil
}

// normalize appends p, normalised, to dst.
func (n *normalizer) normalize(dst, p []byte) []byte {
	start := len(dst)
	for len(p) > 0 {
		if n.cr {
			n.cr = false
			dst = append(dst, '\r', '\n')
			if p[0] == '\n' {
				p = p[1:]
				continue
			}
		}
		i := cleanLines(p)
		dst = append(dst, p[:i]...)
		if i == len(p) {
			break
		}
		switch p[i] {
		case '\n':
			dst = append(dst, '\r', '\n')
		case '\r':
			n.cr = true
		}
		p = p[i+1:]
	}
	if len(dst) > start {
		n.wrote, n.last = true, dst[len(dst)-1]
	}
	return dst
}

// cleanLines returns the length of the longest start of p that
// normalising leaves as it is: lines ended by CRLF with no CR, LF or NUL
// before it, then bytes that are none of the three. It looks for them a
// byte value at a time (bytes.IndexByte, vectorised) rather than for the
// three at once, which goes byte by byte.
func cleanLines(p []byte) int {
	k := 0
	for {
		rest := p[k:]
		i := bytes.IndexByte(rest, '\r')
		if i < 0 {
			i = len(rest)
		}
		line := rest[:i]
		if j := bytes.IndexByte(line, '\n'); j >= 0 {
			line = line[:j]
		}
		if j := bytes.IndexByte(line, 0); j >= 0 {
			line = line[:j]
		}
		if len(line) < i || i == len(rest) || i+1 == len(rest) || rest[i+1] != '\n' {
			return k + len(line)
		}
		k += i + 2
	}
}

// headerSection finds where the header section of msg, the start of a
// CRLF-normalised message, ends (see mailproto.HeaderEnd), and whether that is known
// yet: a blank line follows, or a line that is not a field, or complete
// says msg is the whole message. A header section not known to end may go
// on past msg.
func headerSection(msg []byte, complete bool) (end int, blank, ended bool) {
	end, blank = mailproto.HeaderEnd(msg)
	ended = blank || complete || bytes.Contains(msg[end:], []byte("\r\n"))
	return end, blank, ended
}

// header is what the door needs to know of a message's header section.
type header struct {
	from      []*mail.Address // parsed From: addresses
	fromCount int             // number of From: fields
	fromErr   error
	messageID string
	hasDate   bool
	received  int
}

// addrParser does not need display names, so it accepts any charset in
// encoded words instead of failing on, say, koi8-r.
var addrParser = mail.AddressParser{WordDecoder: &mime.WordDecoder{
	CharsetReader: func(_ string, input io.Reader) (io.Reader, error) { return input, nil },
}}

var errBadHeader = errors.New("malformed header section")

// parseHeader reads the fields of a header section that mailproto.HeaderEnd found.
func parseHeader(section []byte) (header, error) {
	var h header
	tr := textproto.NewReader(bufio.NewReader(io.MultiReader(bytes.NewReader(section), strings.NewReader("\r\n"))))
	fields, err := tr.ReadMIMEHeader()
	if err != nil {
		return h, fmt.Errorf("%w: %v", errBadHeader, err)
	}
	froms := fields.Values("From")
	h.fromCount = len(froms)
	if len(froms) == 1 {
		h.from, h.fromErr = addrParser.ParseList(froms[0])
		if h.fromErr == nil && len(h.from) == 0 {
			h.fromErr = errors.New("empty From field")
		}
	}
	h.messageID = strings.TrimSpace(fields.Get("Message-Id"))
	h.hasDate = fields.Get("Date") != ""
	h.received = len(fields.Values("Received"))
	return h, nil
}

// receivedField is the trace field of RFC 5321 section 4.4, with the
// protocol names of RFC 3848.
func receivedField(helo, clientIP, hostname, proto, id string, now time.Time) string {
	return fmt.Sprintf("Received: from %s ([%s])\r\n\tby %s (smarthost) with %s id %s;\r\n\t%s\r\n",
		sanitizeHelo(helo), clientIP, hostname, proto, id, now.Format(time.RFC1123Z))
}

// sanitizeHelo keeps a client's HELO name from injecting anything into the
// Received: field: only the characters of a domain or address literal pass.
func sanitizeHelo(s string) string {
	if len(s) > 255 {
		s = s[:255]
	}
	b := []byte(s)
	for i, c := range b {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '.' || c == '-' || c == '_' || c == ':' || c == '[' || c == ']'
		if !ok {
			b[i] = '_'
		}
	}
	if len(b) == 0 {
		return "unknown"
	}
	return string(b)
}
