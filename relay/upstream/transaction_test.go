package upstream

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"smarthost/internal/smtptest"
	"smarthost/queue"
)

func TestDeliverPerRecipient(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{RcptReply: func(to string) *smtp.SMTPError {
		switch to {
		case "gone@example.net":
			return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "No such user"}
		case "full@example.net":
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 2, 2}, Message: "Mailbox full, try later"}
		}
		return nil
	}})
	env := newDeliverer(t, plainUpstream("a", s))
	m := testMessage("app@example.com", "x@example.net", "gone@example.net", "full@example.net", "y@example.net")
	m.Recipients[3].State = queue.Delivered // done in an earlier attempt: not sent again
	res := deliver(t, env.d, m, deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	checkResult(t, res[1], "gone@example.net", queue.Failed, "550 5.1.1 No such user", "a")
	checkResult(t, res[2], "full@example.net", queue.Pending, "451 4.2.2 Mailbox full, try later", "a")
	got := s.WaitMessages(t, 1, 5*time.Second)
	if to := strings.Join(got[0].To, " "); to != "x@example.net" {
		t.Errorf("upstream recipients %q, want only x@example.net", to)
	}
	if !strings.Contains(env.log.String(), "delivered=1 deferred=1 failed=1") {
		t.Errorf("log lacks the counts:\n%s", env.log.String())
	}
}

func TestDeliverAllRecipientsRefused(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{RcptReply: reply(550, smtp.EnhancedCode{5, 1, 1}, "No such user")})
	env := newDeliverer(t, plainUpstream("a", s))
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net", "y@example.net"), deliverBody)
	checkResult(t, res[0], "x@example.net", queue.Failed, "550 5.1.1 No such user", "a")
	checkResult(t, res[1], "y@example.net", queue.Failed, "550 5.1.1 No such user", "a")
	if n := len(s.Messages()); n != 0 {
		t.Errorf("%d messages, want none", n)
	}
}

func TestDeliverMessageReplies(t *testing.T) {
	tests := []struct {
		name  string
		opts  smtptest.Options
		state queue.RcptState
		reply string
	}{
		{"5xx after data", smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
			return &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Content rejected"}
		}}, queue.Failed, "554 5.6.0 Content rejected"},
		{"4xx after data", smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
			return &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Try again"}
		}}, queue.Pending, "451 4.3.0 Try again"},
		{"5xx to mail", smtptest.Options{MailReply: reply(553, smtp.EnhancedCode{5, 7, 1}, "Sender not allowed")},
			queue.Failed, "553 5.7.1 Sender not allowed"},
		{"no reply after data", smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
			return smtptest.Drop
		}}, queue.Pending, "end of data: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := smtptest.Start(t, tt.opts)
			env := newDeliverer(t, plainUpstream("a", s))
			res := deliver(t, env.d, testMessage("app@example.com", "x@example.net", "y@example.net"), deliverBody)
			checkResult(t, res[0], "x@example.net", tt.state, tt.reply, "a")
			checkResult(t, res[1], "y@example.net", tt.state, tt.reply, "a")
		})
	}
}

func TestDeliverDotStuffing(t *testing.T) {
	s := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("a", s))
	body := "Subject: dots\r\n\r\n.\r\n.leading dot\r\n..two dots\r\nmiddle . dot\r\n.\r\n\r\n.\r\nlast\r\n"
	res := deliver(t, env.d, testMessage("app@example.com", "x@example.net"), body)
	checkResult(t, res[0], "x@example.net", queue.Delivered, "250 ", "a")
	if got := s.WaitMessages(t, 1, 5*time.Second)[0].Data; string(got) != body {
		t.Errorf("upstream got %q, want %q", got, body)
	}
}

func TestDeliverNotCancelledDuringData(t *testing.T) {
	entered := make(chan struct{})
	proceed := make(chan struct{})
	s := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError {
		close(entered)
		<-proceed
		return nil
	}})
	env := newDeliverer(t, plainUpstream("a", s))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan []queue.Result)
	go func() {
		done <- env.d.Deliver(ctx, testMessage("app@example.com", "x@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	<-entered // the whole message has been sent
	cancel()
	close(proceed)
	res := <-done
	if len(res) != 1 || res[0].State != queue.Delivered {
		t.Errorf("delivery cancelled after DATA: %+v", res)
	}
}

func TestDeliverCancelledBeforeData(t *testing.T) {
	entered := make(chan struct{})
	proceed := make(chan struct{})
	s := smtptest.Start(t, smtptest.Options{MailReply: func(string) *smtp.SMTPError {
		close(entered)
		<-proceed
		return nil
	}})
	b := smtptest.Start(t, smtptest.Options{})
	env := newDeliverer(t, plainUpstream("a", s), plainUpstream("b", b))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan []queue.Result)
	go func() {
		done <- env.d.Deliver(ctx, testMessage("app@example.com", "x@example.net"), queue.NewBody([]byte(deliverBody)))
	}()
	<-entered
	cancel()
	res := <-done // returns without waiting for the upstream's reply
	close(proceed)
	if len(res) != 1 || res[0].State != queue.Pending || !strings.HasPrefix(res[0].Reply, "interrupted: ") {
		t.Errorf("delivery cancelled before DATA: %+v", res)
	}
	if len(s.Messages())+len(b.Messages()) != 0 || b.Connections() != 0 {
		t.Errorf("delivery went on after cancellation")
	}
}

func TestDeliverNoFailoverAfterDot(t *testing.T) {
	tests := []struct {
		name  string
		reply *smtp.SMTPError
		state queue.RcptState
		via   string
		text  string
	}{
		// The upstream may have taken it: do not send it elsewhere now.
		{"connection lost", smtptest.Drop, queue.Pending, "a", "end of data: "},
		// A reply is an answer: 4xx goes on, 5xx is final.
		{"4xx", &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Try later"}, queue.Delivered, "b", "250 "},
		{"5xx", &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Spam"}, queue.Failed, "a", "554 5.7.1 Spam"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := smtptest.Start(t, smtptest.Options{DataReply: func(string, []string, []byte) *smtp.SMTPError { return tt.reply }})
			b := smtptest.Start(t, smtptest.Options{})
			env := newDeliverer(t, plainUpstream("a", a), plainUpstream("b", b))
			res := deliver(t, env.d, testMessage("app@example.com", "x@example.net", "y@example.net"), deliverBody)
			checkResult(t, res[0], "x@example.net", tt.state, tt.text, tt.via)
			checkResult(t, res[1], "y@example.net", tt.state, tt.text, tt.via)
			if tried := b.Connections() > 0; tried != (tt.via == "b") {
				t.Errorf("b tried: %v", tried)
			}
		})
	}
}
