package relay

// Reason says why the submission side refused a connection, a command or
// a message: the "reason" of its log lines and the label of its metrics.
type Reason string

// Reasons of Observer.ConnectionRefused: a connection turned away before
// SMTP.
const (
	ReasonUntrustedNetwork    Reason = "untrusted_network"
	ReasonMaxConnections      Reason = "max_connections"
	ReasonMaxConnectionsPerIP Reason = "max_connections_per_ip"
	// ReasonProxyHeader: a PROXY header that could not be read, or one
	// sent by a source not in proxy_trusted; also a rejection.
	ReasonProxyHeader Reason = "proxy_header"
)

// Reasons of Observer.Rejected.
const (
	ReasonAuthRequired       Reason = "auth_required"
	ReasonAuthTimeout        Reason = "auth_timeout"
	ReasonCredentialsChanged Reason = "credentials_changed"
	ReasonBadSender          Reason = "bad_sender"
	ReasonSenderNotAllowed   Reason = "sender_not_allowed"
	ReasonNoRoute            Reason = "no_route"
	ReasonBadRecipient       Reason = "bad_recipient"
	ReasonBadHeader          Reason = "bad_header"
	ReasonLoop               Reason = "loop"
	ReasonTooLarge           Reason = "too_large"
	ReasonLineTooLong        Reason = "line_too_long"
	ReasonTimeout            Reason = "timeout"
	ReasonStorage            Reason = "storage"
	ReasonInternal           Reason = "internal"
	ReasonShuttingDown       Reason = "shutting_down"
	// ReasonRateLimited: over a user's or a client address's rate_limit
	// or recipient_limit; the reply is temporary.
	ReasonRateLimited Reason = "rate_limited"
	// ReasonRecipientNotAllowed: a recipient outside the user's
	// allowed_recipients.
	ReasonRecipientNotAllowed Reason = "recipient_not_allowed"
)

// Reasons of a failed AUTH, which the Observer hears as AuthFailed or
// AuthBlocked rather than Rejected.
const (
	ReasonAuthFailed   Reason = "auth_failed"
	ReasonAuthIdentity Reason = "auth_identity"
	ReasonAuthBlocked  Reason = "auth_blocked"
)

// RefuseReasons returns every reason of Observer.ConnectionRefused.
func RefuseReasons() []Reason {
	return []Reason{ReasonUntrustedNetwork, ReasonMaxConnections, ReasonMaxConnectionsPerIP, ReasonProxyHeader}
}

// RejectReasons returns every reason of Observer.Rejected. Too many
// recipients is not among them: go-smtp answers that itself, unseen.
func RejectReasons() []Reason {
	return []Reason{
		ReasonAuthRequired, ReasonAuthTimeout, ReasonCredentialsChanged,
		ReasonBadSender, ReasonSenderNotAllowed, ReasonNoRoute, ReasonBadRecipient,
		ReasonBadHeader, ReasonLoop, ReasonTooLarge, ReasonLineTooLong, ReasonTimeout,
		ReasonProxyHeader, ReasonStorage, ReasonInternal, ReasonShuttingDown,
		ReasonRateLimited, ReasonRecipientNotAllowed,
	}
}
