package config

import (
	"fmt"
	"net/url"
	"os"
	"slices"
	"strings"

	"smarthost/queue"
	"smarthost/relay"
	"smarthost/webhook"
)

// webhooks reads the [[webhook]] tables; users are the configured
// [[user]]s that users = [...] may name. Each message names the webhook,
// as its key names its index.
func (p *parser) webhooks(root *table, users []relay.User) []webhook.Endpoint {
	known := map[string]bool{}
	for _, u := range users {
		known[u.Name] = true
	}
	var out []webhook.Endpoint
	seen := map[string]string{}
	for _, t := range root.tables("webhook") {
		var e webhook.Endpoint
		e.Name = t.uniqueName(seen)
		errorf := t.errorf // names the webhook once its name is read

		if s, ok := t.str("url"); ok {
			if err := checkWebhookURL(s); err != nil {
				errorf("url", "%v", err)
			}
			e.URL = s
		} else if !t.has("url") {
			errorf("url", "required: where the events are posted (https://…)")
		}

		e.Events = webhook.DefaultEvents()
		if evs, ok := t.strings("events"); ok {
			e.Events = nil
			if len(evs) == 0 {
				errorf("events", "must name at least one event; leave it out for bounced and expired")
			}
			for i, ev := range evs {
				key := fmt.Sprintf("events[%d]", i)
				switch typ := queue.EventType(ev); {
				case !slices.Contains(queue.WebhookEvents(), typ):
					errorf(key, "%q is not one of accepted, delivered, deferred, bounced, expired", ev)
				case slices.Contains(e.Events, typ):
					errorf(key, "%q is listed twice", ev)
				default:
					e.Events = append(e.Events, typ)
				}
			}
		}

		if t.has("secret") {
			errorf("secret", "secrets never live in the config file; use secret_env or secret_file")
		}
		env, hasEnv := t.str("secret_env")
		file, hasFile := t.str("secret_file")
		var secret, key string
		switch {
		case hasEnv && hasFile:
			errorf("secret_file", "set only one of secret_env and secret_file")
		case !t.readsSecret("webhook "+e.Name) && (hasEnv || hasFile):
			if hasEnv {
				t.secretNamed("secret_env", env)
			} else {
				t.secretNamed("secret_file", file)
			}
		case hasEnv:
			key = "secret_env"
			if env == "" {
				errorf(key, "must name an environment variable")
			} else if secret = os.Getenv(env); secret == "" {
				errorf(key, "environment variable %s is not set or empty", env)
			}
		case hasFile:
			key = "secret_file"
			if data := t.readFile(key, file); data != nil {
				if secret = strings.TrimSpace(string(data)); secret == "" {
					errorf(key, "%s is empty", file)
				}
			}
		case !t.has("secret_env") && !t.has("secret_file"):
			errorf("secret_env", `required: give secret_env or secret_file, holding "whsec_" and a base64 key of 24 to 64 random bytes`)
		}
		if secret != "" {
			k, err := webhook.ParseSecret(secret)
			if err != nil {
				// The error never quotes the secret.
				errorf(key, "the secret %v", err)
			}
			e.Key = k
		}

		names, _ := t.strings("users")
		for i, n := range names {
			key := fmt.Sprintf("users[%d]", i)
			switch {
			case !known[n]:
				errorf(key, "no [[user]] is named %q", n)
			case slices.Contains(e.Users, n):
				errorf(key, "%q is listed twice", n)
			default:
				e.Users = append(e.Users, n)
			}
		}
		t.done()
		out = append(out, e)
	}
	return out
}

// checkWebhookURL accepts an absolute http or https URL without
// credentials: the requests are signed instead, and a password in the
// URL would reach logs and dashboards.
func checkWebhookURL(s string) error {
	u, err := url.Parse(s)
	switch {
	case err != nil:
		return fmt.Errorf("%q is not a URL", s)
	case u.Scheme != "http" && u.Scheme != "https":
		return fmt.Errorf(`%q: want an http:// or https:// URL`, s)
	case u.Host == "" || u.Hostname() == "":
		return fmt.Errorf("%q has no host", s)
	case u.User != nil:
		return fmt.Errorf("the URL must not hold credentials (user or password); the posts are signed with the secret")
	case u.Fragment != "":
		return fmt.Errorf("%q: a #fragment is never sent", s)
	}
	return nil
}
