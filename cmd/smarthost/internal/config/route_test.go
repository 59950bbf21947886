package config_test

import (
	"reflect"
	"testing"

	"smarthost/cmd/smarthost/internal/config/configtest"
	"smarthost/relay/upstream"
)

func TestParseConfigRouteToDomain(t *testing.T) {
	f := configtest.NewFiles(t)
	cfg := configtest.MustParse(t, f.Config(map[string]string{
		"upstream": configtest.Base("upstream") + "\n[[upstream]]\nname = \"corp\"\naddress = \"127.0.0.1:2526\"\ntls = \"none\"",
		"route": configtest.Base("route") +
			"\n[[route]]\nto_domain = \"Corp.Example.COM\"\nupstreams = [\"corp\", \"up\"]" +
			"\n[[route]]\nto_domain = \"example.com\"\nupstreams = [\"up\"]",
	}))
	want := []upstream.Route{
		{FromDomain: "example.com", Upstreams: []string{"up"}},
		{ToDomain: "corp.example.com", Upstreams: []string{"corp", "up"}},
		{ToDomain: "example.com", Upstreams: []string{"up"}},
	}
	if !reflect.DeepEqual(cfg.Routes, want) {
		t.Errorf("routes = %+v\nwant %+v", cfg.Routes, want)
	}

	// A sender domain without a route of its own may still write to a
	// recipient domain with one.
	configtest.MustParse(t, f.Config(map[string]string{
		"user":  "[[user]]\nname = \"a\"\npassword_hash = \"{{HASH}}\"\nallowed_from = [\"a@other.example\", \"*\"]",
		"route": "[[route]]\nto_domain = \"corp.example.com\"\nupstreams = [\"up\"]",
	}))
}

func TestParseConfigRouteToDomainRules(t *testing.T) {
	f := configtest.NewFiles(t)
	tests := []struct {
		name, route, key, msg string
	}{
		{"both", "[[route]]\nfrom_domain = \"example.com\"\nto_domain = \"corp.example.com\"\nupstreams = [\"up\"]",
			"route[0].to_domain", "not both"},
		{"neither", configtest.Base("route") + "\n[[route]]\nupstreams = [\"up\"]",
			"route[1].from_domain", "or to_domain"},
		{"duplicate", configtest.Base("route") + "\n[[route]]\nto_domain = \"corp.example.com\"\nupstreams = [\"up\"]\n[[route]]\nto_domain = \"CORP.example.com\"\nupstreams = [\"up\"]",
			"route[2].to_domain", `"corp.example.com" is already routed by route[1]`},
		{"wildcard", "[[route]]\nto_domain = \"*\"\nupstreams = [\"up\"]",
			"route[0].to_domain", "not a domain name"},
		{"bad", "[[route]]\nto_domain = \"corp example\"\nupstreams = [\"up\"]",
			"route[0].to_domain", "not a domain name"},
		{"not a string", "[[route]]\nto_domain = [\"corp.example.com\"]\nupstreams = [\"up\"]",
			"route[0].to_domain", "must be a string"},
		{"upstreams missing", "[[route]]\nto_domain = \"corp.example.com\"",
			"route[0].upstreams", "required"},
		{"unknown upstream", "[[route]]\nto_domain = \"corp.example.com\"\nupstreams = [\"nope\"]",
			"route[0].upstreams[0]", `no [[upstream]] is named "nope"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			errs := parseErrors(t, f.Config(map[string]string{"route": tt.route}))
			requireError(t, errs, tt.key, tt.msg)
		})
	}
}
