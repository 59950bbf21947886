package config_test

import (
	"testing"

	"smarthost/cmd/smarthost/internal/config/configtest"
)

// TestOpenRelayRefused covers the listener combinations that could relay
// for anyone, and the ones that are safe.
func TestOpenRelayRefused(t *testing.T) {
	f := configtest.NewFiles(t)
	tests := []struct {
		name     string
		listen   string
		key, msg string // "" when the listener is accepted
	}{
		{"auth none without trusted_networks", `auth = "none"`, "listen[0].auth", "open relay"},
		{"auth none with empty trusted_networks", "auth = \"none\"\ntrusted_networks = []", "listen[0].auth", "open relay"},
		{"everything IPv4", "auth = \"none\"\ntrusted_networks = [\"0.0.0.0/0\"]", "listen[0].trusted_networks[0]", "every address"},
		{"everything IPv4 despite override", "auth = \"none\"\ntrusted_networks = [\"0.0.0.0/0\"]\nallow_public_networks = true", "listen[0].trusted_networks[0]", "every address"},
		{"everything IPv6 despite override", "auth = \"none\"\ntrusted_networks = [\"::/0\"]\nallow_public_networks = true", "listen[0].trusted_networks[0]", "every address"},
		{"everything IPv4-mapped", "auth = \"none\"\ntrusted_networks = [\"::ffff:0.0.0.0/96\"]\nallow_public_networks = true", "listen[0].trusted_networks[0]", "every address"},
		{"public CIDR", "auth = \"none\"\ntrusted_networks = [\"10.0.0.0/8\", \"198.51.100.0/24\"]", "listen[0].trusted_networks[1]", "allow_public_networks"},
		{"public IP", "auth = \"none\"\ntrusted_networks = [\"8.8.8.8\"]", "listen[0].trusted_networks[0]", "allow_public_networks"},
		{"private range too wide", "auth = \"none\"\ntrusted_networks = [\"10.0.0.0/7\"]", "listen[0].trusted_networks[0]", "allow_public_networks"},
		{"public IPv6", "auth = \"none\"\ntrusted_networks = [\"2001:db8::/32\"]", "listen[0].trusted_networks[0]", "allow_public_networks"},
		{"plain-text AUTH", `auth = "required"`, "listen[0].tls", "plain text"},

		{"public CIDR with override", "auth = \"none\"\ntrusted_networks = [\"198.51.100.0/24\"]\nallow_public_networks = true", "", ""},
		{"private ranges", "auth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\", \"10.1.0.0/16\", \"172.16.0.0/12\", \"192.168.0.0/16\", \"100.64.0.0/10\", \"169.254.0.0/16\", \"::1\", \"fd00::/8\", \"fe80::/10\"]", "", ""},
		{"plain-text AUTH from trusted networks", "auth = \"required\"\ntrusted_networks = [\"10.0.0.0/8\"]", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			text := f.Config(map[string]string{
				"listen": "[[listen]]\naddress = \":25\"\ntls = \"none\"\n" + tt.listen,
			})
			if tt.key == "" {
				configtest.MustParse(t, text)
				return
			}
			requireError(t, parseErrors(t, text), tt.key, tt.msg)
		})
	}
}
