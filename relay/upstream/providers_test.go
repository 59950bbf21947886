package upstream

import (
	"slices"
	"testing"
	"time"

	"smarthost/internal/mailproto"
)

// TestProviderProfiles holds every profile to the settings its provider
// documents (see the comments in providers.go).
func TestProviderProfiles(t *testing.T) {
	tests := []struct {
		name, region string
		address      string
		tls          mailproto.TLSMode
		auth         AuthMode
		rate         Rate
		senderLogin  bool
	}{
		{"gmail", "", "smtp.gmail.com:465", mailproto.TLSImplicit, AuthPassword, Rate{500, 24 * time.Hour}, false},
		{"google-workspace-relay", "", "smtp-relay.gmail.com:587", mailproto.TLSStartTLS, "", Rate{10000, 24 * time.Hour}, false},
		{"yandex", "", "smtp.yandex.ru:465", mailproto.TLSImplicit, AuthPassword, Rate{500, 24 * time.Hour}, true},
		{"mailru", "", "smtp.mail.ru:465", mailproto.TLSImplicit, AuthPassword, Rate{250, 24 * time.Hour}, true},
		{"yahoo", "", "smtp.mail.yahoo.com:465", mailproto.TLSImplicit, AuthPassword, Rate{250, 24 * time.Hour}, true},
		{"outlook365", "", "smtp.office365.com:587", mailproto.TLSStartTLS, AuthXOAUTH2, Rate{30, 5 * time.Minute}, true},
		{"ses", "eu-west-1", "email-smtp.eu-west-1.amazonaws.com:587", mailproto.TLSStartTLS, AuthPassword, Rate{200, 24 * time.Hour}, false},
		{"ses", "", "", mailproto.TLSStartTLS, AuthPassword, Rate{200, 24 * time.Hour}, false},
		{"mailgun", "", "smtp.mailgun.org:587", mailproto.TLSStartTLS, AuthPassword, Rate{100, 24 * time.Hour}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name+"/"+tt.region, func(t *testing.T) {
			p, ok := LookupProvider(tt.name)
			if !ok {
				t.Fatalf("LookupProvider(%q) found nothing", tt.name)
			}
			if p.Name != tt.name || p.Auth != tt.auth || p.SenderMustBeLogin != tt.senderLogin || p.Notes == "" {
				t.Errorf("profile %+v, want auth %q, sender must be login %v, notes", p, tt.auth, tt.senderLogin)
			}
			if p.Regional() != (tt.name == "ses") {
				t.Errorf("Regional() = %v", p.Regional())
			}
			want := Upstream{Name: "up", Address: tt.address, TLS: tt.tls, RateLimit: tt.rate}
			if got := p.Upstream("up", tt.region); got.Name != want.Name || got.Address != want.Address ||
				got.TLS != want.TLS || got.RateLimit != want.RateLimit || got.Username != "" || got.EnvelopeFrom != "" || got.Auth != "" {
				t.Errorf("Upstream = %+v, want %+v", got, want)
			}
		})
	}
}

func TestProviderNames(t *testing.T) {
	want := []string{"gmail", "google-workspace-relay", "mailgun", "mailru", "outlook365", "ses", "yahoo", "yandex"}
	if got := ProviderNames(); !slices.Equal(got, want) {
		t.Errorf("ProviderNames() = %q, want %q", got, want)
	}
	for _, name := range []string{"", "Gmail", "office365", "unknown"} {
		if p, ok := LookupProvider(name); ok {
			t.Errorf("LookupProvider(%q) = %+v", name, p)
		}
	}
	// A region does nothing to a provider with a fixed address.
	p, _ := LookupProvider("gmail")
	if got := p.Upstream("g", "eu-west-1").Address; got != "smtp.gmail.com:465" {
		t.Errorf("gmail with a region: address %q", got)
	}
}
