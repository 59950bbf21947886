package config_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

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
