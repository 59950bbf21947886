package upstream

import (
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/emersion/go-smtp"
)

// stageError is a failure of one step of an upstream session.
type stageError struct {
	stage string
	err   error
}

func (e *stageError) Error() string { return e.stage + ": " + e.err.Error() }

func (e *stageError) Unwrap() error { return e.err }

// replyText is what a Result records for err: the upstream's reply when
// there was one, else a short local text such as "connect: connection
// refused", free of addresses and credentials.
func replyText(err error) string {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return formatReply(se)
	}
	var st *stageError
	if !errors.As(err, &st) {
		return oneLine(err.Error())
	}
	detail, stage := st.err, st.stage
	var op *net.OpError
	if errors.As(detail, &op) && op.Err != nil {
		detail = op.Err // drop "dial tcp 127.0.0.1:25" and the like
		if op.Op == "dial" && op.Addr != nil {
			stage += " to " + op.Addr.String() // where it tried
		}
	}
	text := strings.TrimPrefix(detail.Error(), "smtp: ")
	if rest, ok := strings.CutPrefix(text, st.stage+": "); ok {
		text = rest
	}
	return oneLine(stage + ": " + text)
}

// formatReply renders an upstream reply as "550 5.1.1 No such user".
func formatReply(se *smtp.SMTPError) string {
	ec := se.EnhancedCode
	if ec == smtp.EnhancedCodeNotSet || ec == smtp.NoEnhancedCode {
		return fmt.Sprintf("%d %s", se.Code, oneLine(se.Message))
	}
	return fmt.Sprintf("%d %d.%d.%d %s", se.Code, ec[0], ec[1], ec[2], oneLine(se.Message))
}

func oneLine(s string) string { return strings.Join(strings.Fields(s), " ") }

func isSMTPError(err error) bool {
	var se *smtp.SMTPError
	return errors.As(err, &se)
}
