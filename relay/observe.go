package relay

// Observer is told what the submission side does, for metrics. listener is
// the Listener's Name; reasons are the fixed words the logs use (Reason,
// see RejectReasons and RefuseReasons), never an address. Calls
// come from the connections' goroutines: they must be quick and safe for
// concurrent use.
type Observer interface {
	// ConnectionOpened: a connection was admitted. Each is followed by one
	// ConnectionClosed.
	ConnectionOpened(listener string)
	ConnectionClosed(listener string)
	// ConnectionRefused: a connection was turned away before SMTP, for
	// one of RefuseReasons.
	ConnectionRefused(listener string, reason Reason)
	// Accepted: a message was queued and answered 250; size is what was
	// stored, signed whether it carries our DKIM signature.
	Accepted(listener string, size int, signed bool)
	// Rejected: a command or a message was refused, for one of
	// RejectReasons (the "reason" of the "rejected" log line).
	Rejected(listener string, reason Reason)
	// AuthFailed: an AUTH attempt failed. AuthBlocked: one was refused
	// with 421 because the client failed too often.
	AuthFailed(listener string)
	AuthBlocked(listener string)
	// UserAccepted: a message of the user was accepted. UserRateLimited:
	// a MAIL or RCPT of the user was refused for its rate_limit or
	// recipient_limit. user is a configured user's name.
	UserAccepted(user string)
	UserRateLimited(user string)
}

// observer returns the Server's Observer, or one that does nothing.
func (s *Server) observer() Observer {
	if s.Observer == nil {
		return nopObserver{}
	}
	return s.Observer
}

type nopObserver struct{}

func (nopObserver) ConnectionOpened(string)          {}
func (nopObserver) ConnectionClosed(string)          {}
func (nopObserver) ConnectionRefused(string, Reason) {}
func (nopObserver) Accepted(string, int, bool)       {}
func (nopObserver) Rejected(string, Reason)          {}
func (nopObserver) AuthFailed(string)                {}
func (nopObserver) AuthBlocked(string)               {}
func (nopObserver) UserAccepted(string)              {}
func (nopObserver) UserRateLimited(string)           {}

// observeReject tells the Observer about a refusal logged with reason.
func (s *session) observeReject(reason Reason) {
	o, name := s.srv.observer(), s.lis.cfg.Name
	switch reason {
	case ReasonAuthFailed, ReasonAuthIdentity:
		o.AuthFailed(name)
	case ReasonAuthBlocked:
		o.AuthBlocked(name)
	default:
		o.Rejected(name, reason)
	}
}
