package upstream

import (
	"slices"
	"strings"
	"time"

	"smarthost/internal/mailproto"
)

// Provider is the profile of a well-known mail provider: the settings an
// [[upstream]] with provider = Name starts from. Every one of them may be
// overridden in the configuration.
type Provider struct {
	Name string
	// Address is the submission host:port. A regional provider's holds
	// "{region}", which Upstream fills in; see Regional.
	Address string
	TLS     mailproto.TLSMode
	// Auth is how the provider expects the relay to log in: AuthPassword
	// (an app password or SMTP credentials), AuthXOAUTH2, or "" where it
	// may also authorise the relay by its IP address. Upstream leaves it
	// out: with OAuth credentials configured, an OAuth2 Auth here is the
	// default mechanism; without them, the password is used.
	Auth AuthMode
	// RateLimit is the default pacing: the provider's published quota, or
	// a conservative figure where it publishes none (see the table).
	RateLimit Rate
	// SenderMustBeLogin marks a provider that refuses any MAIL FROM but
	// the authenticated login's own address, the null sender included: an
	// upstream using it needs envelope_from, or at least dsn_from for
	// bounces.
	SenderMustBeLogin bool
	// Notes are what an operator should know about the provider's rules.
	Notes string
}

// regionPlaceholder marks where a regional provider's address takes the
// region.
const regionPlaceholder = "{region}"

// Regional reports whether the provider's address depends on a region,
// which the configuration must then give (or an explicit address).
func (p Provider) Regional() bool {
	return strings.Contains(p.Address, regionPlaceholder)
}

// Upstream returns an upstream named name with the profile's address,
// TLS mode and rate limit. For a regional provider the address takes
// region, and stays empty when region is "".
func (p Provider) Upstream(name, region string) Upstream {
	u := Upstream{Name: name, Address: p.Address, TLS: p.TLS, RateLimit: p.RateLimit}
	if p.Regional() {
		u.Address = ""
		if region != "" {
			u.Address = strings.ReplaceAll(p.Address, regionPlaceholder, region)
		}
	}
	return u
}

// LookupProvider returns the profile called name ("gmail", "yandex", …).
func LookupProvider(name string) (Provider, bool) {
	for _, p := range Providers() {
		if p.Name == name {
			return p, true
		}
	}
	return Provider{}, false
}

// ProviderNames lists the known profiles' names, sorted.
func ProviderNames() []string {
	var names []string
	for _, p := range Providers() {
		names = append(names, p.Name)
	}
	slices.Sort(names)
	return names
}

const day = 24 * time.Hour

// Providers returns every known profile. Each entry cites the provider's
// published settings and quota. Quotas are mostly counted per recipient,
// while RateLimit counts messages (SMTP transactions): for mail with many
// recipients per message, set rate_limit lower. Where a provider offers
// both implicit TLS on 465 and STARTTLS on 587, the profile takes 465
// (RFC 8314 section 3.3) unless the provider documents 587 as its port.
func Providers() []Provider {
	return []Provider{
		// https://support.google.com/mail/answer/7126229 (smtp.gmail.com,
		// 465 SSL or 587 STARTTLS); https://support.google.com/mail/answer/22839
		// (consumer Gmail: about 500 recipients a day) and
		// https://support.google.com/a/answer/166852 (Workspace: 2,000
		// messages a day, rolling 24 hours). The lower figure is the
		// default; a Workspace account may set rate_limit = "2000/24h".
		{
			Name: "gmail", Address: "smtp.gmail.com:465", TLS: mailproto.TLSImplicit, Auth: AuthPassword,
			RateLimit: Rate{N: 500, Per: day},
			Notes: "App password (2-Step Verification on) or XOAUTH2. Gmail does not refuse a foreign sender: it rewrites " +
				"MAIL FROM and From: to the login unless the address is a verified \"Send mail as\" alias.",
		},
		// https://support.google.com/a/answer/2956491: smtp-relay.gmail.com
		// on 587 with TLS, authorised by the sending IP address or by SMTP
		// AUTH; each user may relay to 10,000 recipients in 24 hours.
		{
			Name: "google-workspace-relay", Address: "smtp-relay.gmail.com:587", TLS: mailproto.TLSStartTLS,
			RateLimit: Rate{N: 10000, Per: day},
			Notes: "Configured in the Workspace admin console (Gmail > Routing > SMTP relay service); " +
				"leave username out when the relay authorises this host by IP address.",
		},
		// https://yandex.com/support/mail/mail-clients/others.html
		// (smtp.yandex.ru, 465 SSL; 587 STARTTLS also served);
		// https://yandex.com/support/mail/web/letter/create/send-many-letters.html:
		// 500 messages in 24 hours per mailbox, each recipient counting as
		// one, at most 35 recipients per message over SMTP.
		{
			Name: "yandex", Address: "smtp.yandex.ru:465", TLS: mailproto.TLSImplicit, Auth: AuthPassword,
			RateLimit: Rate{N: 500, Per: day}, SenderMustBeLogin: true,
			Notes: "App password (id.yandex.ru > Security). MAIL FROM must be the login's address (553 5.7.1 " +
				"\"Sender address rejected: not owned by auth user\"); <> is refused too.",
		},
		// Mail.ru Help, mail client settings (help.mail.ru): smtp.mail.ru,
		// 465 SSL.
		// Mail.ru publishes no sending quota; the default is half of the
		// 500 a day commonly reported, since exceeding an unpublished
		// limit blocks the mailbox.
		{
			Name: "mailru", Address: "smtp.mail.ru:465", TLS: mailproto.TLSImplicit, Auth: AuthPassword,
			RateLimit: Rate{N: 250, Per: day}, SenderMustBeLogin: true,
			Notes: "Password for external applications (account settings > Security). " +
				"MAIL FROM must be the login's address.",
		},
		// Yahoo Help, "IMAP server settings for Yahoo Mail"
		// (help.yahoo.com): smtp.mail.yahoo.com, 465 SSL or 587 STARTTLS,
		// app password required. Yahoo publishes no daily quota for it;
		// the default is half of the 500 a day commonly reported.
		{
			Name: "yahoo", Address: "smtp.mail.yahoo.com:465", TLS: mailproto.TLSImplicit, Auth: AuthPassword,
			RateLimit: Rate{N: 250, Per: day}, SenderMustBeLogin: true,
			Notes: "App password (Account security > Generate app password). " +
				"MAIL FROM must be the account's address (\"553 From address not verified\").",
		},
		// https://learn.microsoft.com/exchange/mail-flow-best-practices/how-to-set-up-a-multifunction-device-or-application-to-send-email-using-microsoft-365-or-office-365
		// (smtp.office365.com, 587 STARTTLS) and
		// https://learn.microsoft.com/office365/servicedescriptions/exchange-online-service-description/exchange-online-limits
		// (10,000 recipients a day, 30 messages a minute per mailbox).
		// One rate must respect both: 30 in 5 minutes never exceeds 30 in
		// one minute, and makes at most 8,640 messages a day.
		{
			Name: "outlook365", Address: "smtp.office365.com:587", TLS: mailproto.TLSStartTLS, Auth: AuthXOAUTH2,
			RateLimit: Rate{N: 30, Per: 5 * time.Minute}, SenderMustBeLogin: true,
			Notes: "Basic authentication for SMTP AUTH is being retired (off by default for existing tenants from " +
				"the end of 2026): use XOAUTH2. MAIL FROM must be the mailbox or one it has Send As rights for " +
				"(554 5.2.252 SendAsDenied).",
		},
		// https://docs.aws.amazon.com/ses/latest/dg/smtp-connect.html
		// (email-smtp.REGION.amazonaws.com, STARTTLS on 25, 587, 2587;
		// TLS on 465, 2465) and https://docs.aws.amazon.com/ses/latest/dg/quotas.html:
		// a sandbox account may send 200 messages in 24 hours, 1 a second;
		// out of the sandbox the quota is the account's own. The default is
		// the sandbox's; set rate_limit to the account's quota.
		{
			Name: "ses", Address: "email-smtp." + regionPlaceholder + ".amazonaws.com:587", TLS: mailproto.TLSStartTLS, Auth: AuthPassword,
			RateLimit: Rate{N: 200, Per: day},
			Notes: "SMTP credentials from the SES console (not the IAM access key). The sender's address or domain " +
				"must be a verified identity, dsn_from included.",
		},
		// Mailgun documentation, "Send via SMTP" (documentation.mailgun.com):
		// smtp.mailgun.org on 587 (also 25, 465, 2525; smtp.eu.mailgun.org
		// for EU domains). The quota depends on the plan; the default is
		// the free plan's 100 messages a day.
		{
			Name: "mailgun", Address: "smtp.mailgun.org:587", TLS: mailproto.TLSStartTLS, Auth: AuthPassword,
			RateLimit: Rate{N: 100, Per: day},
			Notes: "SMTP credentials of the sending domain (Domain settings > SMTP credentials). " +
				"An EU domain uses address = \"smtp.eu.mailgun.org:587\".",
		},
	}
}
