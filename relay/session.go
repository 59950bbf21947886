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
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"

	"smarthost/queue"
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
	size  int64 // SIZE= of MAIL FROM, a hint for the buffer
}

var _ smtp.AuthSession = (*session)(nil)

func (s *Server) newSession(bl *boundListener, c *smtp.Conn) (smtp.Session, error) {
	tc := findTracked(c.Conn())
	if tc == nil {
		return nil, errInternal
	}
	if s.shutting.Load() {
		tc.closeAfterReply.Store(true)
		s.observer().Rejected(bl.cfg.Name, "shutting_down")
		return nil, errShuttingDown
	}
	sess := &session{srv: s, lis: bl, conn: c, tc: tc, ip: tc.ip}
	sess.log = s.Logger.With("listener", bl.cfg.Name, "client_ip", tc.ip.String())
	tc.sess.Store(sess)
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

func (s *session) reject(reason string, err *smtp.SMTPError, attrs ...any) error {
	attrs = append(attrs, "reason", reason, "reply", err.Code)
	if s.user != nil {
		attrs = append(attrs, "user", s.user.Name)
	}
	s.log.Info("rejected", attrs...)
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
				return s.reject("auth_identity", errAuthIdentity, "username", username)
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
		return s.reject("auth_blocked", errAuthBlocked, "username", username)
	}
	u := s.srv.users.Load().byName[username]
	ok := false
	if u == nil {
		bcrypt.CompareHashAndPassword(dummyHash, []byte(password))
	} else {
		ok = s.srv.creds.check(u, password)
	}
	if !ok {
		return s.reject("auth_failed", errAuthInvalid, "username", username)
	}
	s.srv.limiter.forgive(s.ip)
	s.user = u
	s.log = s.log.With("user", u.Name)
	s.log.Debug("authenticated")
	return nil
}

// Mail starts a transaction (RFC 5321 section 3.3).
func (s *session) Mail(from string, opts *smtp.MailOptions) error {
	if s.srv.shutting.Load() {
		s.tc.closeAfterReply.Store(true)
		s.srv.observer().Rejected(s.lis.cfg.Name, "shutting_down")
		return errShuttingDown
	}
	if s.lis.cfg.AuthRequired && s.user == nil {
		return s.reject("auth_required", errAuthRequired)
	}
	if from != "" && !validPath(from) {
		return s.reject("bad_sender", errBadSender)
	}
	if s.user != nil && !SenderAllowed(s.user.AllowedFrom, from) {
		return s.reject("sender_not_allowed", errSenderDenied, "from", from)
	}
	if s.srv.Routable != nil && !s.srv.Routable(from) {
		return s.reject("no_route", errNoRoute, "from", from)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.inTx = true
	s.from = from
	s.rcpts = s.rcpts[:0]
	s.size = 0
	if opts != nil {
		s.size = opts.Size
	}
	return nil
}

// Rcpt adds a recipient; go-smtp enforces the recipient limit (452 4.5.3).
func (s *session) Rcpt(to string, _ *smtp.RcptOptions) error {
	if !validPath(to) {
		return s.reject("bad_recipient", errBadRcpt)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, r := range s.rcpts {
		if r == to {
			return nil
		}
	}
	s.rcpts = append(s.rcpts, to)
	return nil
}

// Reset ends the transaction.
func (s *session) Reset() {
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

	id, err := s.accept(r, from, rcpts, size)
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
	limits := s.srv.Limits
	hint := int64(4 << 10)
	if size > hint {
		hint = size
	}
	if limits.MaxMessageBytes > 0 && hint > limits.MaxMessageBytes {
		hint = limits.MaxMessageBytes
	}
	s.beginData()
	buf, err := readNormalized(r, int(hint))
	if err != nil {
		var ne net.Error
		switch {
		case errors.Is(err, smtp.ErrTooLongLine):
			return "", s.reject("line_too_long", errLineTooLong)
		case errors.As(err, &ne) && ne.Timeout():
			// go-smtp drains the rest of DATA before it replies; a deadline
			// already past ends that at once instead of after another wait.
			s.tc.beginData(0, time.Now())
			s.tc.closeAfterReply.Store(true)
			return "", s.reject("timeout", errTimeout)
		}
		var se *smtp.SMTPError
		if errors.As(err, &se) {
			return "", s.reject("too_large", se)
		}
		return "", err
	}
	msg := buf[headroom:]

	end, blank := headerEnd(msg)
	h, err := parseHeader(msg[:end])
	if err != nil {
		return "", s.reject("bad_header", &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Malformed message header"})
	}
	if h.received > maxReceived {
		return "", s.reject("loop", errLoop)
	}
	headerFrom := from
	switch {
	case h.fromCount > 1:
		return "", s.reject("bad_header", errManyFrom)
	case h.fromCount == 0 && from == "":
		return "", s.reject("bad_header", errNoFrom)
	case h.fromCount == 1 && h.fromErr != nil:
		return "", s.reject("bad_header", errBadFrom)
	case h.fromCount == 1:
		headerFrom = h.from[0].Address
		if s.user != nil {
			for _, a := range h.from {
				if !SenderAllowed(s.user.AllowedFrom, a.Address) {
					return "", s.reject("sender_not_allowed", errSenderDenied, "header_from", a.Address)
				}
			}
		}
	}
	if !blank && end < len(msg) {
		// A body line right after the fields: insert the empty line that
		// separates them, as the fields we add must not run into the body.
		fixed := make([]byte, 0, len(buf)+2)
		fixed = append(fixed, buf[:headroom+end]...)
		fixed = append(fixed, '\r', '\n')
		buf = append(fixed, buf[headroom+end:]...)
	}

	id := queue.NewID()
	now := s.srv.Now()
	msgID := h.messageID
	var fields []byte
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
	d := door{buf: buf, start: headroom}
	d.prepend(fields)

	signed := false
	if signer := s.srv.currentSigner(); signer != nil {
		// Signed once, here, over the final bytes: the stored message is
		// what every attempt sends, so a retry never re-signs.
		sig, err := signer.Sign(DomainOf(headerFrom), d.bytes())
		if err != nil {
			s.log.Error("signing failed", "queue_id", id, "error", err)
			s.srv.observer().Rejected(s.lis.cfg.Name, "internal")
			return "", errInternal
		}
		d.prepend(sig)
		signed = len(sig) > 0
	}
	body := d.bytes()

	m := &queue.Message{
		ID:        id,
		From:      from,
		MessageID: msgID,
		Size:      int64(len(body)),
		Received:  now,
	}
	if s.user != nil {
		m.User = s.user.Name
	}
	for _, r := range rcpts {
		m.Recipients = append(m.Recipients, queue.Recipient{Addr: r})
	}
	if err := s.srv.Queue.Put(context.Background(), m, body); err != nil {
		s.log.Error("queue write failed", "queue_id", id, "error", err)
		s.srv.observer().Rejected(s.lis.cfg.Name, "storage")
		return "", errStorage
	}
	attrs := []any{"queue_id", id, "msg_id", msgID, "from", from, "rcpts", len(rcpts), "size", len(body), "dkim_signed", signed}
	if st, ok := s.conn.TLSConnectionState(); ok {
		attrs = append(attrs, "tls", tls.VersionName(st.Version))
	}
	s.log.Info("accepted", attrs...)
	s.srv.observer().Accepted(s.lis.cfg.Name, len(body), signed)
	return id, nil
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
