package config_test

import (
	"strings"
	"testing"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/cmd/smarthost/internal/config/configtest"
)

// TestUnknownKeyDidYouMean: an unknown key a typo away from a known one
// is refused with the known one named; one far from any, without.
func TestUnknownKeyDidYouMean(t *testing.T) {
	f := configtest.NewFiles(t)
	for _, tc := range []struct {
		upstream, want string
	}{
		{"pasword_env = \"X\"", `upstream[0].pasword_env: unknown key; did you mean password_env? [upstream "up"]`},
		{"max_conections = 4", `upstream[0].max_conections: unknown key; did you mean max_connections? [upstream "up"]`},
		{"colour = \"blue\"", `upstream[0].colour: unknown key [upstream "up"]`},
	} {
		text := f.Config(map[string]string{"upstream": configtest.Base("upstream") + "\n" + tc.upstream})
		_, err := config.Parse([]byte(f.Expand(text)), "test.toml")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want %q", tc.upstream, err, tc.want)
		}
	}
	text := f.Config(map[string]string{"top": configtest.Base("top") + "\nlog_levl = \"debug\""})
	if _, err := config.Parse([]byte(text), "test.toml"); err == nil || !strings.Contains(err.Error(), "log_levl: unknown key; did you mean log_level?") {
		t.Errorf("top-level typo: %v", err)
	}
}

// TestErrorsNameTheTable: a problem in a [[user]] or [[upstream]] names it
// by its name as well as its index.
func TestErrorsNameTheTable(t *testing.T) {
	f := configtest.NewFiles(t)
	text := f.Config(map[string]string{
		"user":     configtest.Base("user") + "\nallowed_recipients_typo = 1",
		"upstream": "[[upstream]]\nname = \"gmail\"\naddress = \"smtp.gmail.com\"\ntls = \"implicit\"",
	})
	_, err := config.Parse([]byte(text), "test.toml")
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{`[user "app"]`, `upstream[0].address:`, `[upstream "gmail"]`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("errors lack %q:\n%v", want, err)
		}
	}
}

// TestTLSPortWarnings: implicit TLS on 587 and STARTTLS on 465, on a
// listener or an upstream, are warned about with the usual port; the
// configuration is still valid.
func TestTLSPortWarnings(t *testing.T) {
	f := configtest.NewFiles(t)
	cfg := configtest.MustParse(t, f.Config(map[string]string{
		"listen":   "[[listen]]\naddress = \"127.0.0.1:587\"\ntls = \"implicit\"\nauth = \"required\"",
		"upstream": "[[upstream]]\nname = \"up\"\naddress = \"smtp.example.com:465\"\ntls = \"starttls\"",
	}))
	var got []string
	for _, w := range cfg.Warnings {
		got = append(got, w.Error())
	}
	all := strings.Join(got, "\n")
	if len(got) != 2 || !strings.Contains(all, `listen[0].tls: tls = "implicit" on port 587`) || !strings.Contains(all, "usually port 465") ||
		!strings.Contains(all, `upstream[0].tls: tls = "starttls" on port 465`) || !strings.Contains(all, "usually port 587") || !strings.Contains(all, `[upstream "up"]`) {
		t.Errorf("warnings:\n%s", all)
	}
	ok := configtest.MustParse(t, f.Config(map[string]string{
		"listen":   "[[listen]]\naddress = \"127.0.0.1:465\"\ntls = \"implicit\"\nauth = \"required\"",
		"upstream": "[[upstream]]\nname = \"up\"\naddress = \"smtp.example.com:587\"\ntls = \"starttls\"",
	}))
	if len(ok.Warnings) != 0 {
		t.Errorf("warnings for the usual ports: %v", ok.Warnings)
	}
}

// TestAuthListenerWithoutUsers: a listener that requires AUTH with no
// [[user]] is refused, naming the listener; with auth = "none" and
// trusted networks it is not.
func TestAuthListenerWithoutUsers(t *testing.T) {
	f := configtest.NewFiles(t)
	_, err := config.Parse([]byte(f.Config(map[string]string{"user": ""})), "test.toml")
	if err == nil || !strings.Contains(err.Error(), `listen[0].auth: "required", and no [[user]] is configured: nobody can submit`) {
		t.Errorf("error %v", err)
	}
	configtest.MustParse(t, f.Config(map[string]string{
		"user":   "",
		"listen": "[[listen]]\naddress = \"127.0.0.1:0\"\ntls = \"none\"\nauth = \"none\"\ntrusted_networks = [\"127.0.0.0/8\"]",
		"route":  "[[route]]\nfrom_domain = \"*\"\nupstreams = [\"up\"]",
	}))
}
