// Package dkim signs messages at the door with DKIM (RFC 6376, and RFC
// 8463 for Ed25519) on top of go-msgauth, and loads, generates and checks
// signing keys.
package dkim

import (
	"bufio"
	"bytes"
	"crypto"
	"errors"
	"fmt"
	"net/textproto"
	"strings"
	"sync/atomic"
	"time"

	msgauth "github.com/emersion/go-msgauth/dkim"
)

// DefaultHeaders are the fields signed when a key names none: those a
// receiver shows or acts on, the MIME structure, and RFC 8058's one-click
// unsubscribe pair that large receivers require to be signed. Only those
// present in a message are signed, plus one more From so that a second
// From: cannot be added (RFC 6376 section 8.15).
var DefaultHeaders = []string{
	"From", "Reply-To", "Sender", "Subject", "Date", "To", "Cc", "Message-ID",
	"In-Reply-To", "References", "MIME-Version", "Content-Type",
	"Content-Transfer-Encoding", "Content-Disposition", "Content-ID",
	"List-Id", "List-Unsubscribe", "List-Unsubscribe-Post", "Feedback-ID",
}

// Key is one signing key for one domain and selector.
type Key struct {
	Domain   string // d=; lower case
	Selector string // s=
	Signer   crypto.Signer
	// Headers to sign, in order; nil means DefaultHeaders. From is always
	// signed and over-signed.
	Headers []string
	// HeaderCanonicalization and BodyCanonicalization are "relaxed"
	// (default) or "simple".
	HeaderCanonicalization string
	BodyCanonicalization   string
	// Expiration, when set, adds x= that long after signing.
	Expiration time.Duration
	// Subdomains lets the key sign for every subdomain of Domain that has
	// no key of its own.
	Subdomains bool
}

// Signer signs each message with every key of its header From: domain.
// It is safe for concurrent use; build a new one to change keys.
type Signer struct {
	byDomain map[string][]Key
	now      func() time.Time

	signed, unsigned atomic.Uint64
}

// New checks keys and returns a Signer for them. now may be nil.
func New(keys []Key, now func() time.Time) (*Signer, error) {
	if now == nil {
		now = time.Now
	}
	s := &Signer{byDomain: make(map[string][]Key), now: now}
	for i, k := range keys {
		k.Domain = strings.ToLower(strings.TrimSuffix(k.Domain, "."))
		if k.Domain == "" || k.Selector == "" || k.Signer == nil {
			return nil, fmt.Errorf("dkim key %d: domain, selector and key are required", i)
		}
		if err := CheckKey(k.Signer); err != nil {
			return nil, fmt.Errorf("dkim key %d (%s, %s): %w", i, k.Domain, k.Selector, err)
		}
		for _, c := range []string{k.HeaderCanonicalization, k.BodyCanonicalization} {
			if c != "" && c != "relaxed" && c != "simple" {
				return nil, fmt.Errorf("dkim key %d (%s, %s): canonicalization %q is not relaxed or simple", i, k.Domain, k.Selector, c)
			}
		}
		s.byDomain[k.Domain] = append(s.byDomain[k.Domain], k)
	}
	return s, nil
}

// KeysFor returns the keys that sign for a header From: domain: the
// domain's own, else those of the nearest parent with Subdomains set.
func (s *Signer) KeysFor(domain string) []Key {
	domain = strings.ToLower(strings.TrimSuffix(domain, "."))
	if keys := s.byDomain[domain]; len(keys) > 0 {
		return keys
	}
	for d := domain; ; {
		i := strings.IndexByte(d, '.')
		if i < 0 {
			return nil
		}
		d = d[i+1:]
		var out []Key
		for _, k := range s.byDomain[d] {
			if k.Subdomains {
				out = append(out, k)
			}
		}
		if len(out) > 0 {
			return out
		}
	}
}

// Sign returns the DKIM-Signature fields, each ending in CRLF, to put in
// front of msg, a CRLF-normalised message whose header From: is in
// fromDomain. It returns nil when no key signs for that domain: such mail
// is relayed unsigned. msg is read once per key and never copied. It is
// Stream over the whole message, so both sign the same way.
func (s *Signer) Sign(fromDomain string, msg []byte) ([]byte, error) {
	st, err := s.Stream(fromDomain, msg)
	if err != nil {
		return nil, err
	}
	return st.Finish()
}

// Stream signs one message given in pieces, for a message too large to
// hold in memory: header is the start of the CRLF-normalised message, at
// least its whole header section up to and including the empty line that
// ends it (the fields to sign are chosen from it); Write takes the rest,
// in order; Finish returns what Sign would. A Stream that will not be
// finished must be aborted. It is not safe for concurrent use.
type Stream struct {
	s       *Signer
	keys    []Key
	signers []*msgauth.Signer // one per key, fed the same bytes
	err     error             // the first failure; it ends the stream
	done    bool
}

// Stream starts signing a message whose header From: is in fromDomain,
// with every key for that domain. With no key, the Stream signs nothing
// and Finish returns nil.
func (s *Signer) Stream(fromDomain string, header []byte) (*Stream, error) {
	st := &Stream{s: s, keys: s.KeysFor(fromDomain)}
	if len(st.keys) == 0 {
		return st, nil
	}
	present, err := headerNames(header)
	if err != nil {
		return nil, err
	}
	for _, k := range st.keys {
		signer, err := s.newSigner(k, present)
		if err != nil {
			st.Abort()
			return nil, fmt.Errorf("dkim %s (%s): %w", k.Domain, k.Selector, err)
		}
		st.signers = append(st.signers, signer)
	}
	if _, err := st.Write(header); err != nil {
		st.Abort()
		return nil, err
	}
	return st, nil
}

// Write adds the next bytes of the message to every signature.
func (st *Stream) Write(p []byte) (int, error) {
	if st.err != nil {
		return 0, st.err
	}
	if st.done {
		return 0, errStreamDone
	}
	for i, signer := range st.signers {
		if _, err := signer.Write(p); err != nil {
			k := st.keys[i]
			st.err = fmt.Errorf("dkim %s (%s): %w", k.Domain, k.Selector, err)
			return 0, st.err
		}
	}
	return len(p), nil
}

// Finish ends the message and returns the DKIM-Signature fields, each
// ending in CRLF, to put in front of it; nil when no key signs for its
// domain.
func (st *Stream) Finish() ([]byte, error) {
	if st.done {
		return nil, errStreamDone
	}
	st.done = true
	if st.err != nil {
		st.closeAll()
		return nil, st.err
	}
	if len(st.signers) == 0 {
		st.s.unsigned.Add(1)
		return nil, nil
	}
	var out []byte
	for i, signer := range st.signers {
		if err := signer.Close(); err != nil {
			k := st.keys[i]
			st.closeAll()
			return nil, fmt.Errorf("dkim %s (%s): %w", k.Domain, k.Selector, err)
		}
		st.signers[i] = nil
		out = append(out, signer.Signature()...)
	}
	st.s.signed.Add(1)
	return out, nil
}

// Abort gives up a message that will not be finished: it ends the
// goroutine that go-msgauth runs for each signature. It does nothing on a
// Stream already finished or aborted.
func (st *Stream) Abort() {
	if st.done {
		return
	}
	st.done = true
	st.closeAll()
}

// closeAll closes the signers not yet closed. go-msgauth has no way to
// cancel a signature: closing completes it, and the result is dropped.
func (st *Stream) closeAll() {
	for i, signer := range st.signers {
		if signer != nil {
			signer.Close()
			st.signers[i] = nil
		}
	}
}

var errStreamDone = errors.New("dkim: stream already finished")

func (s *Signer) newSigner(k Key, present map[string]bool) (*msgauth.Signer, error) {
	opts := &msgauth.SignOptions{
		Domain:                 k.Domain,
		Selector:               k.Selector,
		Signer:                 k.Signer,
		Hash:                   crypto.SHA256,
		HeaderCanonicalization: canonicalization(k.HeaderCanonicalization),
		BodyCanonicalization:   canonicalization(k.BodyCanonicalization),
		HeaderKeys:             headerKeys(k.Headers, present),
	}
	if k.Expiration > 0 {
		opts.Expiration = s.now().Add(k.Expiration)
	}
	return msgauth.NewSigner(opts)
}

// Counts returns how many messages were signed, and how many had no key.
func (s *Signer) Counts() (signed, unsigned uint64) {
	return s.signed.Load(), s.unsigned.Load()
}

func canonicalization(c string) msgauth.Canonicalization {
	if c == "simple" {
		return msgauth.CanonicalizationSimple
	}
	return msgauth.CanonicalizationRelaxed
}

// headerKeys lists the fields to sign: the wanted ones that the message
// has, and From once more than it has.
func headerKeys(wanted []string, present map[string]bool) []string {
	if wanted == nil {
		wanted = DefaultHeaders
	}
	keys := []string{"From"}
	for _, h := range wanted {
		if strings.EqualFold(h, "From") {
			continue
		}
		if present[textproto.CanonicalMIMEHeaderKey(h)] {
			keys = append(keys, h)
		}
	}
	return append(keys, "From")
}

var errNoHeader = errors.New("message has no header section")

// headerNames returns the names of the fields in msg's header section.
func headerNames(msg []byte) (map[string]bool, error) {
	h, err := textproto.NewReader(bufio.NewReader(bytes.NewReader(msg))).ReadMIMEHeader()
	if err != nil && len(h) == 0 {
		return nil, fmt.Errorf("%w: %v", errNoHeader, err)
	}
	names := make(map[string]bool, len(h))
	for k := range h {
		names[k] = true
	}
	return names, nil
}
