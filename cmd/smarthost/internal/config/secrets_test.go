package config_test

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/cmd/smarthost/internal/config/configtest"
)

// TestReadSecretsPasswordFile: a rewritten password_file is read again; a
// missing or empty one is an error naming the upstream and the key, and
// leaves the running configuration alone.
func TestReadSecretsPasswordFile(t *testing.T) {
	f := configtest.NewFiles(t)
	pw := configtest.WriteFile(t, t.TempDir(), "password", "old-secret\n")
	t.Setenv("SMARTHOST_TEST_PW", "from-env")
	ups := configtest.Base("upstream") + "\nusername = \"relay@example.com\"\npassword_file = \"" + pw + "\"\n\n" +
		"[[upstream]]\nname = \"env\"\naddress = \"127.0.0.1:2526\"\ntls = \"none\"\nusername = \"u\"\npassword_env = \"SMARTHOST_TEST_PW\""
	cfg := configtest.MustParse(t, f.Config(map[string]string{"upstream": ups}))

	got, changed, err := cfg.ReadSecrets()
	if err != nil || len(changed) != 0 || got[0].Password != "old-secret" {
		t.Fatalf("unchanged file: changed %v, password %q, err %v", changed, got[0].Password, err)
	}

	if err := os.WriteFile(pw, []byte("new-secret\r\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("SMARTHOST_TEST_PW", "env-changed")
	got, changed, err = cfg.ReadSecrets()
	if err != nil || !slices.Equal(changed, []string{"up"}) {
		t.Fatalf("changed %v, err %v; want [up]", changed, err)
	}
	if got[0].Password != "new-secret" || got[1].Password != "from-env" {
		t.Errorf("passwords %q, %q; want the file's new one and the environment's as at start", got[0].Password, got[1].Password)
	}
	if cfg.Upstreams[0].Password != "old-secret" {
		t.Errorf("the configuration's own upstream changed to %q", cfg.Upstreams[0].Password)
	}

	for name, content := range map[string]*string{"empty": ptr("\n"), "missing": nil} {
		if content == nil {
			os.Remove(pw)
		} else if err := os.WriteFile(pw, []byte(*content), 0o600); err != nil {
			t.Fatal(err)
		}
		got, changed, err = cfg.ReadSecrets()
		if err == nil || !strings.Contains(err.Error(), `upstream "up": password_file`) || got != nil || changed != nil {
			t.Errorf("%s file: %v, %v, %v; want an error naming upstream \"up\" and password_file", name, got, changed, err)
		}
	}
}

// TestReadSecretsOAuthFiles: the OAuth2 client secret and refresh token
// files are read again like a password_file.
func TestReadSecretsOAuthFiles(t *testing.T) {
	f := configtest.NewFiles(t)
	dir := t.TempDir()
	secret := configtest.WriteFile(t, dir, "client-secret", "s1\n")
	refresh := configtest.WriteFile(t, dir, "refresh", "r1\n")
	up := configtest.Base("upstream") + "\nusername = \"relay@example.com\"\n" +
		"oauth_token_url = \"https://oauth2.googleapis.com/token\"\noauth_client_id = \"id\"\n" +
		"oauth_client_secret_file = \"" + secret + "\"\noauth_refresh_token_file = \"" + refresh + "\"\n"
	cfg := configtest.MustParse(t, f.Config(map[string]string{"upstream": up}))
	if _, changed, err := cfg.ReadSecrets(); err != nil || len(changed) != 0 {
		t.Fatalf("unchanged files: changed %v, err %v", changed, err)
	}
	configtest.WriteFile(t, dir, "refresh", "r2\n")
	got, changed, err := cfg.ReadSecrets()
	if err != nil || !slices.Equal(changed, []string{"up"}) {
		t.Fatalf("changed %v, err %v; want [up]", changed, err)
	}
	if o := got[0].OAuth; o.RefreshToken != "r2" || o.ClientSecret != "s1" || o.ClientID != "id" {
		t.Errorf("OAuth %+v, refresh token %q, client secret %q", o, o.RefreshToken, o.ClientSecret)
	}
	if cfg.Upstreams[0].OAuth.RefreshToken != "r1" {
		t.Errorf("the configuration's own OAuth changed")
	}
	if err := os.Remove(filepath.Join(dir, "client-secret")); err != nil {
		t.Fatal(err)
	}
	if _, _, err := cfg.ReadSecrets(); err == nil || !strings.Contains(err.Error(), "oauth_client_secret_file") {
		t.Errorf("missing client secret: %v", err)
	}
}

func ptr[T any](v T) *T { return &v }

// TestLoadWithoutSecrets: a configuration whose every kind of secret is
// named but absent (variables unset, files missing) fails a full load with
// one problem per secret; NoSecrets validates it without looking at any of
// them; UpstreamSecrets reads only the chosen upstream's. Everything else
// is still checked.
func TestLoadWithoutSecrets(t *testing.T) {
	f := configtest.NewFiles(t)
	m := f.Missing
	ups := `[[upstream]]
name = "env"
address = "127.0.0.1:2525"
tls = "none"
username = "u"
password_env = "SMARTHOST_TEST_UNSET_PW"

[[upstream]]
name = "file"
address = "127.0.0.1:2526"
tls = "none"
username = "u"
password_file = "` + m + `.pw"

[[upstream]]
name = "oauth"
address = "127.0.0.1:2527"
tls = "none"
username = "relay@example.com"
oauth_token_url = "https://oauth2.googleapis.com/token"
oauth_client_id = "id"
oauth_client_secret_file = "` + m + `.client"
oauth_refresh_token_file = "` + m + `.refresh"

[[upstream]]
name = "sa"
address = "127.0.0.1:2528"
tls = "none"
username = "relay@example.com"
oauth_service_account_file = "` + m + `.sa.json"`
	text := f.Config(map[string]string{
		"queue":    "[queue]\nbackend = \"postgres\"\ndsn_env = \"SMARTHOST_TEST_UNSET_DSN\"",
		"tls":      "[tls]\ncert_file = \"" + m + ".tls.crt\"\nkey_file = \"" + m + ".tls.key\"",
		"dkim":     "[[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nkey_file = \"" + m + ".dkim.key\"",
		"upstream": ups,
		"route":    "[[route]]\nfrom_domain = \"example.com\"\nupstreams = [\"env\", \"file\", \"oauth\", \"sa\"]",
		"http": "[http]\nadmin_token_env = \"SMARTHOST_TEST_UNSET_TOKEN\"\n\n" +
			"[[webhook]]\nname = \"hook\"\nurl = \"https://hooks.example.com/\"\nsecret_file = \"" + m + ".hook\"",
	})
	path := configtest.WriteFile(t, t.TempDir(), "config.toml", text)

	secretKeys := []string{
		"queue.dsn_env", "tls.cert_file", "tls.key_file", "dkim[0].key_file",
		"upstream[0].password_env", "upstream[1].password_file",
		"upstream[2].oauth_client_secret_file", "upstream[2].oauth_refresh_token_file",
		"upstream[3].oauth_service_account_file",
		"http.admin_token_env", "webhook[0].secret_file",
	}
	_, err := config.Load(path)
	if err == nil {
		t.Fatal("a configuration with no secret at hand loaded")
	}
	for _, k := range secretKeys {
		if !strings.Contains(err.Error(), k+":") {
			t.Errorf("full load: no problem named %s in\n%v", k, err)
		}
	}

	cfg, err := config.LoadFiltered(path, config.NoSecrets)
	if err != nil {
		t.Fatalf("NoSecrets: %v", err)
	}
	if !cfg.SecretsSkipped || cfg.DKIM[0].Signer != nil || cfg.Upstreams[1].Password != "" {
		t.Errorf("NoSecrets: skipped %v, DKIM signer %v, password %q", cfg.SecretsSkipped, cfg.DKIM[0].Signer, cfg.Upstreams[1].Password)
	}

	// Only the chosen upstream's secrets are read.
	_, err = config.LoadFiltered(path, config.UpstreamSecrets("file"))
	var errs config.Errors
	if !errors.As(err, &errs) || len(errs) != 1 || errs[0].Key != "upstream[1].password_file" {
		t.Errorf("UpstreamSecrets(file): %v; want only upstream[1].password_file", err)
	}
	pw := configtest.WriteFile(t, t.TempDir(), "pw", "s3cret\n")
	withPW := strings.Replace(text, m+".pw", pw, 1)
	path = configtest.WriteFile(t, t.TempDir(), "config.toml", withPW)
	cfg, err = config.LoadFiltered(path, config.UpstreamSecrets("file"))
	if err != nil || cfg.Upstreams[1].Password != "s3cret" {
		t.Fatalf("UpstreamSecrets(file) with its file present: %v", err)
	}
	if _, err := config.LoadFiltered(path, config.UpstreamSecrets("")); err == nil ||
		!strings.Contains(err.Error(), "upstream[0].password_env") || strings.Contains(err.Error(), "dkim[0]") {
		t.Errorf("UpstreamSecrets(\"\") reads every upstream's secrets and no other: %v", err)
	}

	// What is not a secret is still checked, and a secret must still be named.
	broken := strings.Replace(withPW, `password_env = "SMARTHOST_TEST_UNSET_PW"`, `password_env = ""`, 1)
	broken = strings.Replace(broken, `tls = "none"`, `tls = "plain"`, 1)
	path = configtest.WriteFile(t, t.TempDir(), "config.toml", broken)
	_, err = config.LoadFiltered(path, config.NoSecrets)
	for _, want := range []string{
		"upstream[0].password_env: must name an environment variable",
		`upstream[0].tls: must be "implicit", "starttls" or "none", not "plain"`,
	} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("NoSecrets on a broken configuration: want %q in\n%v", want, err)
		}
	}
}
