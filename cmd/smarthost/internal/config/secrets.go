package config

import (
	"fmt"
	"os"
	"reflect"
	"strings"

	"smarthost/relay/upstream"
)

// SecretFilter chooses which parts of a configuration have their secrets
// read by LoadFiltered: part is "upstream NAME", "dkim", "tls", "queue",
// "webhook NAME" or "http". A secret not read is still checked to be
// named (an environment variable or a file), but neither its variable nor
// its file is looked at, so a configuration can be validated where its
// secrets do not exist, as in CI.
type SecretFilter func(part string) bool

// NoSecrets reads no secret.
func NoSecrets(string) bool { return false }

// UpstreamSecrets reads only the secrets of the upstream named name, or of
// every upstream when name is "": what check-upstream needs.
func UpstreamSecrets(name string) SecretFilter {
	return func(part string) bool {
		n, ok := strings.CutPrefix(part, "upstream ")
		return ok && (name == "" || n == name)
	}
}

// readsSecret reports whether the parse reads the secrets of part.
func (t *table) readsSecret(part string) bool {
	return t.secrets == nil || t.secrets(part)
}

// secretNamed checks that key k names an environment variable (a key
// ending in _env) or a file, for a secret the parse does not read.
func (t *table) secretNamed(k, name string) {
	switch {
	case name != "":
	case strings.HasSuffix(k, "_env"):
		t.errorf(k, "must name an environment variable")
	default:
		t.errorf(k, "must not be empty")
	}
}

// SecretFiles names the files an [[upstream]]'s secrets were read from;
// "" for a secret not taken from a file.
type SecretFiles struct {
	Password            string // password_file
	OAuthClientSecret   string // oauth_client_secret_file
	OAuthRefreshToken   string // oauth_refresh_token_file
	OAuthServiceAccount string // oauth_service_account_file
}

// passwordValue is a password_file's password: its content without the
// line end an editor adds. Other white space may belong to the password.
func passwordValue(data []byte) string {
	return strings.TrimSuffix(strings.TrimSuffix(string(data), "\n"), "\r")
}

// trimmed is an OAuth2 secret file's secret: its content without
// surrounding white space.
func trimmed(data []byte) string { return strings.TrimSpace(string(data)) }

// ReadSecrets reads the files of the upstreams' secrets (UpstreamSecrets)
// again, as when a Kubernetes Secret mounted as files is rotated, and
// returns a copy of Upstreams with what the files hold now, and the names
// of the upstreams whose secrets changed. Secrets from the environment
// (password_env) are read only by Load. A file that cannot be read, is
// empty or does not parse is an error naming its upstream and key, and
// no upstream changes: a rotation may be half done.
func (c *Config) ReadSecrets() (ups []upstream.Upstream, changed []string, err error) {
	ups = make([]upstream.Upstream, len(c.Upstreams))
	copy(ups, c.Upstreams)
	for i := range ups {
		u := &ups[i]
		f, ok := c.UpstreamSecrets[u.Name]
		if !ok {
			continue
		}
		// read reads a file and checks that value, what it holds, is
		// not empty, as Load does.
		read := func(key, path string, value func([]byte) string) ([]byte, error) {
			data, err := os.ReadFile(path)
			if err == nil && value(data) == "" {
				err = fmt.Errorf("%s is empty", path)
			}
			if err != nil {
				return nil, fmt.Errorf("upstream %q: %s: %w", u.Name, key, err)
			}
			return data, nil
		}
		differs := false
		if f.Password != "" {
			data, err := read("password_file", f.Password, passwordValue)
			if err != nil {
				return nil, nil, err
			}
			if p := passwordValue(data); p != u.Password {
				u.Password, differs = p, true
			}
		}
		if u.OAuth != nil {
			o := *u.OAuth
			if f.OAuthClientSecret != "" {
				data, err := read("oauth_client_secret_file", f.OAuthClientSecret, trimmed)
				if err != nil {
					return nil, nil, err
				}
				o.ClientSecret = trimmed(data)
			}
			if f.OAuthRefreshToken != "" {
				data, err := read("oauth_refresh_token_file", f.OAuthRefreshToken, trimmed)
				if err != nil {
					return nil, nil, err
				}
				o.RefreshToken = trimmed(data)
			}
			if f.OAuthServiceAccount != "" {
				data, err := read("oauth_service_account_file", f.OAuthServiceAccount, trimmed)
				if err != nil {
					return nil, nil, err
				}
				sa, err := upstream.ParseServiceAccount(data)
				if err == nil && o.TokenURL == "" {
					err = checkTokenURL(sa.TokenURI)
				}
				if err != nil {
					return nil, nil, fmt.Errorf("upstream %q: oauth_service_account_file: %s: %w", u.Name, f.OAuthServiceAccount, err)
				}
				o.ServiceAccount = sa
			}
			if !reflect.DeepEqual(&o, u.OAuth) {
				u.OAuth, differs = &o, true
			}
		}
		if differs {
			changed = append(changed, u.Name)
		}
	}
	return ups, changed, nil
}
