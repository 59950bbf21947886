package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"smarthost/dkim"
	"smarthost/internal/mailproto"
	"smarthost/queue"
	"smarthost/relay/upstream"
)

// session is one client connection's SMTP state, driven by go-smtp.
type session struct {
	srv  *Server
	lis  *boundListener
	conn *smtp.Conn
	tc   *trackedConn
	ip   netip.Addr
	log  *slog.Logger

	user *User // after a successful AUTH

	mu    sync.Mutex
	inTx  bool
	from  string
	rcpts []string
	size  int64  // SIZE= of MAIL FROM, a hint for the buffer
	slots []slot // taken in rate-limit windows by this transaction
}

var _ smtp.AuthSession = (*session)(nil)

func (s *Server) newSession(bl *boundListener, c *smtp.Conn) (smtp.Session, error) {
	tc := findTracked(c.Conn())
	if tc == nil {
		return nil, errInternal
	}
	if s.shutting.Load() {
		tc.closeAfterReply.Store(true)
		s.observer().Rejected(bl.cfg.Name, ReasonShuttingDown)
		return nil, errShuttingDown
	}
	sess := &session{srv: s, lis: bl, conn: c, tc: tc, ip: tc.ip}
	sess.log = s.Logger.With("listener", bl.cfg.Name, "client_ip", tc.ip.String())
	tc.sess.Store(sess)
	out := c.Conn() // after STARTTLS, the TLS connection
	tc.out.Store(&out)
	return sess, nil
}

// findTracked finds the connection the gate admitted under any TLS layer.
func findTracked(c net.Conn) *trackedConn {
	if t, ok := c.(*tls.Conn); ok {
		c = t.NetConn()
	}
	tc, _ := c.(*trackedConn)
	return tc
}

func (s *session) inTransaction() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.inTx
}

func (s *session) reject(reason Reason, err *smtp.SMTPError, attrs ...any) error {
	attrs = append(attrs, "reason", reason, "reply", err.Code)
	s.log.Info("rejected", attrs...) // s.log names the user once logged in
	s.observeReject(reason)
	return err
}

// AuthMechanisms lists the mechanisms offered; go-smtp advertises them
// only over TLS unless the listener is a trusted plain-text one.
func (s *session) AuthMechanisms() []string {
	if !s.lis.cfg.AuthRequired {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

// Auth starts a SASL exchange for mech.
func (s *session) Auth(mech string) (sasl.Server, error) {
	if !s.lis.cfg.AuthRequired {
		return nil, smtp.ErrAuthUnsupported
	}
	switch mech {
	case sasl.Plain:
		return sasl.NewPlainServer(func(identity, username, password string) error {
			// RFC 4616: an authorization identity other than the user
			// would mean acting as someone else; we do not allow it.
			if identity != "" && identity != username {
				return s.reject(ReasonAuthIdentity, errAuthIdentity, "username", username)
			}
			return s.login(username, password)
		}), nil
	case sasl.Login:
		return &loginServer{auth: s.login}, nil
	}
	return nil, smtp.ErrAuthUnknownMechanism
}

func (s *session) login(username, password string) error {
	if !s.srv.limiter.attempt(s.ip) {
		s.tc.closeAfterReply.Store(true)
		return s.reject(ReasonAuthBlocked, errAuthBlocked, "username", username)
	}
	us := s.srv.users.Load()
	u := us.byName[username]
	ok := false
	if u == nil {
		bcrypt.CompareHashAndPassword(us.dummy, []byte(password))
	} else {
		ok = s.srv.creds.check(u, password)
	}
	s.srv.limiter.done(s.ip, ok)
	if !ok {
		return s.reject(ReasonAuthFailed, errAuthInvalid, "username", username)
	}
	s.tc.loggedIn()
	s.user = u
	s.log = s.log.With("user", u.Name)
	s.log.Debug("authenticated")
	return nil
}

// currentUser returns the session's user as the configuration now has
// it: a reload may have changed its allowed senders. It returns an error
// when the reload removed the user or changed its password: the session
// logged in with credentials that are no longer valid, so it is closed,
// and the client can log in again on a new connection.
func (s *session) currentUser() (*User, error) {
	u := s.srv.users.Load().current(s.user)
	if u == nil {
		s.tc.closeAfterReply.Store(true)
		return nil, s.reject(ReasonCredentialsChanged, errCredentialsChanged)
	}
	return u, nil
}

// Mail starts a transaction (RFC 5321 section 3.3).
func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	if s.srv.shutting.Load() {
		s.tc.closeAfterReply.Store(true)
		s.srv.observer().Rejected(s.lis.cfg.Name, ReasonShuttingDown)
		return errShuttingDown
	}
	if s.lis.cfg.AuthRequired && s.user == nil {
		return s.reject(ReasonAuthRequired, errAuthRequired)
	}
	if s.user != nil {
		u, err := s.currentUser()
		if err != nil {
			return err
		}
		s.user = u
	}
	if from != "" && !validPath(from) {
		return s.reject(ReasonBadSender, errBadSender)
	}
	if s.user != nil && !(from == "" && s.user.AllowNullSender) && !SenderAllowed(s.user.AllowedFrom, from) {
		return s.reject(ReasonSenderNotAllowed, errSenderDenied, "from", from)
	}
	if s.srv.Routable != nil && !s.srv.Routable(from) {
		return s.reject(ReasonNoRoute, errNoRoute, "from", from)
	}
	var size int64
	if opts != nil {
		size = opts.Size
	}
	// RFC 1870 section 6.2: a declared size over the limit is refused at
	// MAIL (go-smtp has no limit of its own here; see newSMTPServer).
	if max := s.srv.Limits.MaxMessageBytes; max > 0 && size > max {
		return s.reject(ReasonTooLarge, smtp.ErrDataTooLarge, "size", size)
	}
	// Checked last, so that a MAIL refused for another reason takes no
	// slot; a slot counts only if the message is then accepted.
	s.releaseSlots(false)
	if key, r := s.messageLimit(); r.N > 0 {
		if err := s.limit(key, r, errRateLimited, "from", from, "limit", "rate_limit"); err != nil {
			return err
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inTx = true
	s.from = from
	s.rcpts = s.rcpts[:0]
	s.size = size
	return nil
}

// Rcpt adds a recipient; go-smtp enforces the recipient limit (452 4.5.3).
func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if !validPath(to) {
		return s.reject(ReasonBadRecipient, errBadRcpt)
	}
	s.mu.Lock()
	from, dup := s.from, slices.Contains(s.rcpts, to)
	s.mu.Unlock()
	if s.srv.RcptRoutable != nil && !s.srv.RcptRoutable(from, to) {
		return s.reject(ReasonNoRoute, errNoRoute, "from", from, "to", to)
	}
	if dup {
		return nil
	}
	if u := s.user; u != nil {
		if len(u.AllowedRecipients) > 0 && !SenderAllowed(u.AllowedRecipients, to) {
			return s.reject(ReasonRecipientNotAllowed, errRcptDenied, "to", to)
		}
		if r := u.RecipientLimit; r.N > 0 {
			if err := s.limit(userRecipientsWindow+":"+u.Name, r, errRcptLimited, "to", to, "limit", "recipient_limit"); err != nil {
				return err
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.rcpts = append(s.rcpts, to)
	return nil
}

// limit takes a slot of the window key under the limit r, and refuses
// with over, logged with attrs, when the window is full.
func (s *session) limit(key string, r upstream.Rate, over *smtp.SMTPError, attrs ...any) error {
	ok, err := s.take(key, r)
	if err != nil {
		s.log.Error("rate limit window not read", "error", err)
		return s.reject(ReasonInternal, errInternal)
	}
	if !ok {
		s.rateLimited()
		return s.reject(ReasonRateLimited, over, attrs...)
	}
	return nil
}

// messageLimit returns the window and the limit that count the session's
// messages: its user's rate_limit, or on a listener without AUTH its
// client address's.
func (s *session) messageLimit() (key string, r upstream.Rate) {
	if s.user != nil {
		return userWindow + ":" + s.user.Name, s.user.RateLimit
	}
	if r := s.lis.cfg.RateLimit; r.N > 0 {
		return clientWindow + ":" + s.lis.cfg.Name + ":" + clientKey(s.ip).String(), r
	}
	return "", upstream.Rate{}
}

// rateLimited tells the Observer of a user over one of its limits.
func (s *session) rateLimited() {
	if s.user != nil {
		s.srv.observer().UserRateLimited(s.user.Name)
	}
}

// Reset ends the transaction.
func (s *session) Reset() {
	s.releaseSlots(false)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inTx = false
	s.from = ""
	s.rcpts = nil
	s.size = 0
}

// Logout is called when the connection ends.
func (s *session) Logout() error {
	s.Reset()
	return nil
}

// Data reads, checks, completes and queues the message. The reply is 250
// only once the queue has it on disk.
func (s *session) Data(r io.Reader) error {
	s.mu.Lock()
	from, rcpts, size := s.from, append([]string(nil), s.rcpts...), s.size
	s.mu.Unlock()

	if max := s.srv.Limits.MaxMessageBytes; max > 0 {
		r = &sizeLimit{r: r, left: max}
	}
	id, err := s.accept(r, from, rcpts, size)
	s.tc.endData()
	if s.srv.shutting.Load() {
		s.tc.closeAfterReply.Store(true)
	}
	s.mu.Lock()
	s.inTx = false
	s.mu.Unlock()
	if err != nil {
		return replyFor(err)
	}
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "OK queued as " + id}
}

func (s *session) accept(r io.Reader, from string, rcpts []string, size int64) (string, error) {
	threshold := spoolThreshold
	if s.srv.spoolAfter > 0 {
		threshold = s.srv.spoolAfter
	}
	s.beginData()
	norm := newNormalizer(r)
	// In memory while the floor and the relay's budget allow; if the
	// message goes on, the rest is spooled and only the header section is
	// kept here. Whatever happens, the loan goes back when this returns.
	mb := newMessageBuffer(s.srv.memory, headerLimit, threshold, size)
	defer mb.release()
	spool, err := mb.read(norm)
	if err != nil {
		return "", s.readFailed(err)
	}
	msg := mb.message()

	// The header section must be known to end (a blank line, a line that
	// is not a field, or the end of the message) within the floor, on
	// either path, so that what is accepted does not depend on the load.
	end, blank, ended := headerSection(msg, !spool)
	if !ended || end > mb.floor {
		return "", s.reject(ReasonTooLarge, errHeaderTooLarge, "limit", "header_section")
	}
	h, headerFrom, err := s.checkHeader(msg[:end], from)
	if err != nil {
		return "", err
	}

	id := queue.NewID()
	now := s.srv.Now()
	fields, msgID := s.doorFields(h, from, id, now)
	m := &queue.Message{
		ID:        id,
		From:      from,
		MessageID: msgID,
		Received:  now,
	}
	if s.user != nil {
		m.User = s.user.Name
	}
	for _, r := range rcpts {
		m.Recipients = append(m.Recipients, queue.Recipient{Addr: r})
	}

	var signed bool
	if spool {
		signed, err = s.storeSpooled(m, norm, mb, end, blank, fields, headerFrom)
	} else {
		signed, err = s.store(m, mb.buf, end, blank, fields, headerFrom)
	}
	if err != nil {
		return "", err
	}
	attrs := []any{"queue_id", id, "msg_id", msgID, "from", from, "rcpts", len(rcpts), "size", m.Size, "dkim_signed", signed}
	if spool {
		attrs = append(attrs, "spooled", true)
	}
	if st, ok := s.conn.TLSConnectionState(); ok {
		attrs = append(attrs, "tls", tls.VersionName(st.Version))
	}
	s.releaseSlots(true)
	s.log.Info("accepted", attrs...)
	s.srv.observer().Accepted(s.lis.cfg.Name, int(m.Size), signed)
	if s.user != nil {
		s.srv.observer().UserAccepted(s.user.Name)
	}
	return id, nil
}

// sizeLimit reads a message of at most left bytes (as the client sent them,
// dot-stuffing undone: RFC 1870 section 4) and fails with 552 5.3.4 on the
// byte past it, DATA and BDAT alike.
type sizeLimit struct {
	r    io.Reader
	left int64
}

func (l *sizeLimit) Read(p []byte) (int, error) {
	if l.left < 0 {
		return 0, smtp.ErrDataTooLarge
	}
	// One byte more than allowed is enough to tell that it is too much.
	if int64(len(p)) > l.left+1 {
		p = p[:l.left+1]
	}
	n, err := l.r.Read(p)
	if l.left -= int64(n); l.left < 0 {
		return n, smtp.ErrDataTooLarge
	}
	return n, err
}

// readFailed maps an error reading DATA to the reply.
func (s *session) readFailed(err error) error {
	var ne net.Error
	switch {
	case errors.Is(err, smtp.ErrTooLongLine):
		return s.reject(ReasonLineTooLong, errLineTooLong)
	case errors.As(err, &ne) && ne.Timeout():
		// go-smtp drains the rest of DATA before it replies; a deadline
		// already past ends that at once instead of after another wait.
		s.tc.beginData(0, time.Now())
		s.tc.closeAfterReply.Store(true)
		return s.reject(ReasonTimeout, errTimeout)
	}
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return s.reject(ReasonTooLarge, se)
	}
	return err
}

// checkHeader parses a message's header section and applies the sender
// policy to its From:. It returns the address whose domain picks the DKIM
// key: the header From:, else the envelope sender.
func (s *session) checkHeader(section []byte, from string) (header, string, error) {
	h, err := parseHeader(section)
	if err != nil {
		return h, "", s.reject(ReasonBadHeader, &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Malformed message header"})
	}
	if h.received > maxReceived {
		return h, "", s.reject(ReasonLoop, errLoop)
	}
	headerFrom := from
	switch {
	case h.fromCount > 1:
		return h, "", s.reject(ReasonBadHeader, errManyFrom)
	case h.fromCount == 0 && from == "":
		return h, "", s.reject(ReasonBadHeader, errNoFrom)
	case h.fromCount == 1 && h.fromErr != nil:
		return h, "", s.reject(ReasonBadHeader, errBadFrom)
	case h.fromCount == 1:
		headerFrom = h.from[0].Address
		if s.user != nil {
			for _, a := range h.from {
				if !SenderAllowed(s.user.AllowedFrom, a.Address) {
					return h, "", s.reject(ReasonSenderNotAllowed, headerFromDenied(a.Address), "header_from", a.Address)
				}
			}
		}
	}
	return h, headerFrom, nil
}

// doorFields returns the header fields the door adds in front of a
// message: Received:, and Message-ID:, Date: and From: where missing.
func (s *session) doorFields(h header, from, id string, now time.Time) (fields []byte, msgID string) {
	msgID = h.messageID
	fields = append(fields, receivedField(s.conn.Hostname(), s.ip.String(), s.srv.Hostname, s.protocol(), id, now)...)
	if msgID == "" {
		msgID = fmt.Sprintf("<%s@%s>", id, s.srv.Hostname)
		fields = fmt.Appendf(fields, "Message-ID: %s\r\n", msgID)
	}
	if !h.hasDate {
		fields = fmt.Appendf(fields, "Date: %s\r\n", now.Format(time.RFC1123Z))
	}
	if h.fromCount == 0 {
		fields = fmt.Appendf(fields, "From: <%s>\r\n", from)
	}
	return fields, msgID
}

// store completes and signs a message read whole (buf, after headroom,
// whose header section ends at end) and puts it in the queue.
func (s *session) store(m *queue.Message, buf []byte, end int, blank bool, fields []byte, headerFrom string) (signed bool, err error) {
	if !blank && end < len(buf)-headroom {
		// A body line right after the fields: insert the empty line that
		// separates them, as the fields we add must not run into the body.
		// The buffer keeps room for it (messageSpare).
		at := headroom + end
		buf = append(buf, "\r\n"...)
		copy(buf[at+2:], buf[at:len(buf)-2])
		buf[at], buf[at+1] = '\r', '\n'
	}
	d := door{buf: buf, start: headroom}
	d.prepend(fields)
	if signer := s.srv.signer.Load(); signer != nil {
		// Signed once, here, over the final bytes: the stored message is
		// what every attempt sends, so a retry never re-signs.
		st, err := signer.Stream(mailproto.DomainOf(headerFrom), d.bytes())
		if err != nil {
			return false, s.signingFailed(m.ID, err)
		}
		sig, err := st.Finish()
		if err != nil {
			return false, s.signingFailed(m.ID, err)
		}
		d.prepend(sig)
		signed = len(sig) > 0
	}
	body := d.bytes()
	m.Size = int64(len(body))
	// The queue may hand body to the message's first attempt as it is:
	// nothing changes it after Put.
	if err := s.srv.Queue.Put(context.Background(), m, body); err != nil {
		return false, s.storageFailed(m.ID, err)
	}
	return signed, nil
}

// storeSpooled stores a message too large to hold in memory. mb holds its
// first part, normalised, whose header section ends at end; the rest is
// read from norm. The fields added at the door, the header section and the
// empty line after it are the head, kept in memory; the body goes to a
// spool file chunk by chunk, and through the DKIM signer on the way, so
// that the stored bytes are those store would have stored. Once the first
// part is written, mb is released: a spooling session holds the head and
// two chunks of readChunk, not its message.
func (s *session) storeSpooled(m *queue.Message, norm *normalizer, mb *messageBuffer, end int, blank bool, fields []byte, headerFrom string) (signed bool, err error) {
	msg := mb.message()
	head := make([]byte, 0, len(fields)+end+2)
	head = append(head, fields...)
	head = append(head, msg[:end]...)
	head = append(head, '\r', '\n') // the empty line: msg's own, or the one store inserts
	body := msg[end:]
	if blank {
		body = body[2:]
	}

	sp, err := s.srv.Queue.NewSpool()
	if err != nil {
		return false, s.storageFailed(m.ID, err)
	}
	var st *dkim.Stream
	defer func() {
		if err != nil {
			sp.Abort()
			if st != nil {
				st.Abort()
			}
		}
	}()
	if signer := s.srv.signer.Load(); signer != nil {
		if st, err = signer.Stream(mailproto.DomainOf(headerFrom), head); err != nil {
			return false, s.signingFailed(m.ID, err)
		}
	}
	var chunk []byte
	for {
		if _, err := sp.Write(body); err != nil {
			return false, s.storageFailed(m.ID, err)
		}
		if st != nil {
			if _, err := st.Write(body); err != nil {
				return false, s.signingFailed(m.ID, err)
			}
		}
		if norm.eof {
			break
		}
		if chunk == nil {
			// The first part is on disk: give its memory back.
			mb.release()
			// fill's bound: 2·readChunk + 4 bytes, never more.
			chunk = make([]byte, 0, 2*readChunk+4)
		}
		if chunk, err = norm.fill(chunk[:0], readChunk); err != nil {
			return false, s.readFailed(err)
		}
		body = chunk
	}
	if st != nil {
		sig, err := st.Finish()
		if err != nil {
			return false, s.signingFailed(m.ID, err)
		}
		head = append(sig, head...)
		signed = len(sig) > 0
	}
	if err := s.srv.Queue.PutSpooled(context.Background(), m, head, sp); err != nil {
		return false, s.storageFailed(m.ID, err)
	}
	return signed, nil
}

// storageFailed logs a failure to store a message and returns the reply:
// never 250 for a message that is not on disk. A queue that cannot be
// reached at all (its database down) is a local error rather than a
// lack of storage.
func (s *session) storageFailed(id string, err error) error {
	s.log.Error("queue write failed", "queue_id", id, "error", err)
	s.srv.observer().Rejected(s.lis.cfg.Name, ReasonStorage)
	if errors.Is(err, queue.ErrUnavailable) {
		return errUnavailable
	}
	return errStorage
}

// signingFailed logs a DKIM failure and returns a temporary failure.
func (s *session) signingFailed(id string, err error) error {
	s.log.Error("signing failed", "queue_id", id, "error", err)
	s.srv.observer().Rejected(s.lis.cfg.Name, ReasonInternal)
	return errInternal
}

// protocol names the transfer for Received: (RFC 3848).
func (s *session) protocol() string {
	p := "ESMTP"
	if _, ok := s.conn.TLSConnectionState(); ok {
		p += "S"
	}
	if s.user != nil {
		p += "A"
	}
	return p
}

// beginData bounds DATA in time: each read must make progress within
// ReadTimeout, and the whole transfer must end within DataTimeout.
func (s *session) beginData() {
	lim := s.srv.Limits
	var end time.Time
	if lim.DataTimeout > 0 {
		end = time.Now().Add(lim.DataTimeout)
	}
	s.tc.beginData(lim.ReadTimeout, end)
}

// door holds a message with free space in front for the fields added at
// the door.
type door struct {
	buf   []byte
	start int
}

func (d *door) prepend(fields []byte) {
	if len(fields) <= d.start {
		d.start -= len(fields)
		copy(d.buf[d.start:], fields)
		return
	}
	out := make([]byte, headroom+len(fields)+len(d.buf)-d.start)
	copy(out[headroom:], fields)
	copy(out[headroom+len(fields):], d.buf[d.start:])
	d.buf, d.start = out, headroom
}

func (d *door) bytes() []byte { return d.buf[d.start:] }
