package config_test

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"smarthost/cmd/smarthost/internal/config/configtest"
	"smarthost/queue"
)

func TestParseConfigWebhooks(t *testing.T) {
	f := configtest.NewFiles(t)
	key := make([]byte, 32)
	rand.Read(key)
	secret := "whsec_" + base64.StdEncoding.EncodeToString(key)
	t.Setenv("HOOK_SECRET", secret)
	file := configtest.WriteFile(t, t.TempDir(), "hook.secret", secret+"\n")

	cfg := configtest.MustParse(t, f.Config(map[string]string{"http": `
[[webhook]]
name = "billing"
url = "https://hooks.example.com/smarthost?t=1"
secret_env = "HOOK_SECRET"

[[webhook]]
name = "audit"
url = "http://127.0.0.1:8080/hook"
events = ["accepted", "delivered", "deferred", "bounced", "expired"]
secret_file = "` + file + `"
users = ["app"]
`}))
	if len(cfg.Webhooks) != 2 {
		t.Fatalf("webhooks %+v", cfg.Webhooks)
	}
	b, a := cfg.Webhooks[0], cfg.Webhooks[1]
	if b.Name != "billing" || b.URL != "https://hooks.example.com/smarthost?t=1" || !bytes.Equal(b.Key, key) ||
		!slices.Equal(b.Events, []queue.EventType{queue.EventBounced, queue.EventExpired}) || b.Users != nil {
		t.Errorf("billing: %+v", b)
	}
	if a.Name != "audit" || !bytes.Equal(a.Key, key) || !slices.Equal(a.Events, queue.WebhookEvents()) || !slices.Equal(a.Users, []string{"app"}) {
		t.Errorf("audit: %+v", a)
	}
	if s := fmt.Sprintf("%v %+v %#v", cfg, *cfg, cfg.Webhooks); strings.Contains(s, base64.StdEncoding.EncodeToString(key)) ||
		strings.Contains(s, fmt.Sprint(key)) {
		t.Errorf("the key shows in the printed configuration")
	}

	none := configtest.MustParse(t, f.Config(nil))
	if none.Webhooks != nil {
		t.Errorf("webhooks without [[webhook]]: %+v", none.Webhooks)
	}
}

func TestParseConfigWebhookErrors(t *testing.T) {
	f := configtest.NewFiles(t)
	good := "whsec_" + base64.StdEncoding.EncodeToString(make([]byte, 24))
	short := "whsec_" + base64.StdEncoding.EncodeToString([]byte("sixteen bytes..."))
	t.Setenv("HOOK_SECRET", good)
	t.Setenv("SHORT_SECRET", short)
	t.Setenv("NOT_WHSEC", base64.StdEncoding.EncodeToString(make([]byte, 32)))
	shortFile := configtest.WriteFile(t, t.TempDir(), "short", short)
	missing := filepath.Join(t.TempDir(), "missing")
	hook := func(name, rest string) string {
		return fmt.Sprintf("[[webhook]]\nname = %q\n%s\n", name, rest)
	}
	valid := "url = \"https://h.example/\"\nsecret_env = \"HOOK_SECRET\""
	for _, tc := range []struct {
		text, key, msg string
	}{
		{hook("a", `secret_env = "HOOK_SECRET"`), "webhook[0].url", `required: where the events are posted (https://…) [webhook "a"]`},
		{"[[webhook]]\n" + valid, "webhook[0].name", "required"},
		{hook("a", valid) + hook("a", valid), "webhook[1].name", `"a" is already used by webhook[0]`},
		{hook("a", "url = \"ftp://h.example/\"\nsecret_env = \"HOOK_SECRET\""), "webhook[0].url", "http:// or https://"},
		{hook("a", "url = \"hooks.example/x\"\nsecret_env = \"HOOK_SECRET\""), "webhook[0].url", "http:// or https://"},
		{hook("a", "url = \"https:///x\"\nsecret_env = \"HOOK_SECRET\""), "webhook[0].url", "no host"},
		{hook("a", "url = \"https://u:pw@h.example/\"\nsecret_env = \"HOOK_SECRET\""), "webhook[0].url", "credentials"},
		{hook("a", valid+"\nevents = [\"bounced\", \"opened\"]"), "webhook[0].events[1]", `"opened" is not one of`},
		{hook("a", valid+"\nevents = [\"tried\"]"), "webhook[0].events[0]", `"tried" is not one of`},
		{hook("a", valid+"\nevents = [\"bounced\", \"bounced\"]"), "webhook[0].events[1]", "twice"},
		{hook("a", valid+"\nevents = []"), "webhook[0].events", "at least one"},
		{hook("a", valid+"\nevents = \"bounced\""), "webhook[0].events", "an array"},
		{hook("a", "url = \"https://h.example/\""), "webhook[0].secret_env", "required"},
		{hook("a", valid+"\nsecret_file = \""+shortFile+"\""), "webhook[0].secret_file", "only one"},
		{hook("a", valid+"\nsecret = \""+good+"\""), "webhook[0].secret", "never live in the config file"},
		{hook("a", "url = \"https://h.example/\"\nsecret_env = \"UNSET_HOOK_SECRET\""), "webhook[0].secret_env", "UNSET_HOOK_SECRET is not set"},
		{hook("a", "url = \"https://h.example/\"\nsecret_env = \"SHORT_SECRET\""), "webhook[0].secret_env", `the secret the key is 16 bytes; want 24 to 64 random bytes [webhook "a"]`},
		{hook("a", "url = \"https://h.example/\"\nsecret_env = \"NOT_WHSEC\""), "webhook[0].secret_env", `"whsec_"`},
		{hook("a", "url = \"https://h.example/\"\nsecret_file = \""+shortFile+"\""), "webhook[0].secret_file", "16 bytes"},
		{hook("a", "url = \"https://h.example/\"\nsecret_file = \""+missing+"\""), "webhook[0].secret_file", "no such file"},
		{hook("a", "url = \"https://h.example/\"\nsecret_file = \"{{EMPTY}}\""), "webhook[0].secret_file", "is empty"},
		{hook("a", valid) + hook("b", valid+"\nusers = [\"app\", \"nobody\"]"), "webhook[1].users[1]", `no [[user]] is named "nobody" [webhook "b"]`},
		{hook("a", valid+"\nusers = [\"app\", \"app\"]"), "webhook[0].users[1]", "twice"},
		{hook("a", valid+"\nevnets = [\"bounced\"]"), "webhook[0].evnets", "unknown key"},
	} {
		errs := parseErrors(t, f.Config(map[string]string{"http": tc.text}))
		requireError(t, errs, tc.key, tc.msg)
		for _, s := range []string{good, short, strings.TrimPrefix(good, "whsec_"), strings.TrimPrefix(short, "whsec_")} {
			if strings.Contains(errs.Error(), s) {
				t.Errorf("%s: the error shows a secret:\n%v", tc.text, errs)
			}
		}
	}
}
