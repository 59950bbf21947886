package config_test

import (
	"bytes"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/cmd/smarthost/internal/config/configtest"
)

func TestParseConfigDelayWarning(t *testing.T) {
	f := configtest.NewFiles(t)
	if cfg := configtest.MustParse(t, f.Config(nil)); cfg.Queue.DelayWarning != 0 {
		t.Errorf("default delay_warning = %v, want 0 (off)", cfg.Queue.DelayWarning)
	}
	cfg := configtest.MustParse(t, f.Config(map[string]string{"queue": "[queue]\nmax_age = \"6h\"\ndelay_warning = \"4h\""}))
	if cfg.Queue.DelayWarning != 4*time.Hour || !cfg.Queue.Bounce {
		t.Errorf("queue = %+v, want a 4h delay warning with bounces on", cfg.Queue)
	}
}

// pgQueue is a [queue] table of the postgres backend with extra lines.
func pgQueue(extra string) map[string]string {
	return map[string]string{"queue": "[queue]\nbackend = \"postgres\"\n" + extra}
}

func TestParseConfigQueuePostgres(t *testing.T) {
	f := configtest.NewFiles(t)
	dir := t.TempDir()
	const url = "postgres://smarthost:pw@db.internal:5432/mail?sslmode=verify-full"
	const kv = "host=/run/postgresql dbname=mail user=smarthost password='a b'"
	t.Setenv("SMARTHOST_TEST_DSN", url)
	t.Setenv("SMARTHOST_TEST_DSN_SPACES", "  "+kv+"\n")
	file := configtest.WriteFile(t, dir, "dsn", kv+"\r\nignored second line\n")
	fileNoNewline := configtest.WriteFile(t, dir, "dsn-no-newline", url)

	tests := []struct {
		name  string
		queue string
		dsn   string
		lease time.Duration
	}{
		{"dsn_env URL", "dsn_env = \"SMARTHOST_TEST_DSN\"", url, 30 * time.Second},
		{"dsn_env trimmed", "dsn_env = \"SMARTHOST_TEST_DSN_SPACES\"", kv, 30 * time.Second},
		{"dsn_file first line", "dsn_file = \"" + file + "\"", kv, 30 * time.Second},
		{"dsn_file without newline", "dsn_file = \"" + fileNoNewline + "\"", url, 30 * time.Second},
		{"lease", "dsn_env = \"SMARTHOST_TEST_DSN\"\nlease = \"2m\"", url, 2 * time.Minute},
		{"lease at minimum", "dsn_env = \"SMARTHOST_TEST_DSN\"\nlease = \"5s\"", url, 5 * time.Second},
		{"lease at maximum", "dsn_env = \"SMARTHOST_TEST_DSN\"\nlease = \"10m\"", url, 10 * time.Minute},
		// path is not used by postgres, and not refused either.
		{"path kept", "path = \"/var/lib/other.db\"\ndsn_env = \"SMARTHOST_TEST_DSN\"", url, 30 * time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := configtest.MustParse(t, f.Config(pgQueue(tt.queue))).Queue
			if q.Backend != config.QueuePostgres || string(q.DSN) != tt.dsn || q.Lease != tt.lease {
				t.Errorf("backend %q, DSN %q, lease %v; want postgres, %q, %v", q.Backend, string(q.DSN), q.Lease, tt.dsn, tt.lease)
			}
		})
	}

	// The default stays bbolt, with no DSN.
	q := configtest.MustParse(t, f.Config(nil)).Queue
	if q.Backend != config.QueueBbolt || q.DSN != "" || q.Lease != config.DefaultLease {
		t.Errorf("default queue: backend %q, DSN %q, lease %v", q.Backend, string(q.DSN), q.Lease)
	}
}

func TestParseConfigQueueBackendRules(t *testing.T) {
	f := configtest.NewFiles(t)
	dir := t.TempDir()
	t.Setenv("SMARTHOST_TEST_DSN", "postgres://smarthost@db.internal/mail")
	t.Setenv("SMARTHOST_TEST_DSN_EMPTY", "")
	t.Setenv("SMARTHOST_TEST_DSN_BLANK", " \t")
	t.Setenv("SMARTHOST_TEST_DSN_BAD", "postgres://smarthost@db.internal:port/mail")
	blankFirst := configtest.WriteFile(t, dir, "blank-first", "\npostgres://smarthost@db.internal/mail\n")
	badFile := configtest.WriteFile(t, dir, "bad", "sslmode=sometimes host=db.internal\n")
	okFile := configtest.WriteFile(t, dir, "ok", "host=db.internal\n")
	const env = "dsn_env = \"SMARTHOST_TEST_DSN\"\n"

	tests := []struct {
		name      string
		overrides map[string]string
		key, msg  string
	}{
		{"backend unknown", pgQueueWith("backend = \"sqlite\""), "queue.backend", `must be "bbolt" or "postgres", not "sqlite"`},
		{"backend case", pgQueueWith("backend = \"Postgres\""), "queue.backend", `not "Postgres"`},
		{"backend not a string", pgQueueWith("backend = 2"), "queue.backend", "must be a string"},
		{"postgres without dsn", pgQueue(""), "queue.dsn_env", "required with backend = \"postgres\": give dsn_env or dsn_file"},
		{"postgres with both", pgQueue(env + "dsn_file = \"" + okFile + "\""), "queue.dsn_file", "set only one of dsn_env and dsn_file"},
		{"dsn_env unset", pgQueue("dsn_env = \"SMARTHOST_TEST_DSN_UNSET\""), "queue.dsn_env", "environment variable SMARTHOST_TEST_DSN_UNSET is not set or empty"},
		{"dsn_env empty", pgQueue("dsn_env = \"SMARTHOST_TEST_DSN_EMPTY\""), "queue.dsn_env", "SMARTHOST_TEST_DSN_EMPTY is not set or empty"},
		{"dsn_env blank", pgQueue("dsn_env = \"SMARTHOST_TEST_DSN_BLANK\""), "queue.dsn_env", "SMARTHOST_TEST_DSN_BLANK is not set or empty"},
		{"dsn_env no name", pgQueue("dsn_env = \"\""), "queue.dsn_env", "must name an environment variable"},
		{"dsn_env not a string", pgQueue("dsn_env = 5"), "queue.dsn_env", "must be a string"},
		{"dsn_file missing", pgQueue("dsn_file = \"{{MISSING}}\""), "queue.dsn_file", "no such file"},
		{"dsn_file is a directory", pgQueue("dsn_file = \"" + dir + "\""), "queue.dsn_file", "is a directory"},
		{"dsn_file no name", pgQueue("dsn_file = \"\""), "queue.dsn_file", "must not be empty"},
		{"dsn_file empty", pgQueue("dsn_file = \"{{EMPTY}}\""), "queue.dsn_file", "is empty"},
		{"dsn_file first line blank", pgQueue("dsn_file = \"" + blankFirst + "\""), "queue.dsn_file", "the first line of " + blankFirst + " is empty"},
		{"dsn_env does not parse", pgQueue("dsn_env = \"SMARTHOST_TEST_DSN_BAD\""), "queue.dsn_env", "neither libpq key=value pairs nor a postgres:// URL"},
		{"dsn_file does not parse", pgQueue("dsn_file = \"" + badFile + "\""), "queue.dsn_file", "neither libpq key=value pairs nor a postgres:// URL"},
		{"dsn_env with bbolt", map[string]string{"queue": "[queue]\nbackend = \"bbolt\"\n" + env}, "queue.dsn_env", `only used with backend = "postgres"`},
		{"dsn_file with default backend", map[string]string{"queue": "[queue]\ndsn_file = \"" + okFile + "\""}, "queue.dsn_file", `only used with backend = "postgres"`},
		{"lease with bbolt", map[string]string{"queue": "[queue]\nlease = \"30s\""}, "queue.lease", `only used with backend = "postgres"`},
		{"lease too short", pgQueue(env + "lease = \"4s\""), "queue.lease", "4s is out of range (5s to 10m0s)"},
		{"lease too long", pgQueue(env + "lease = \"601s\""), "queue.lease", "10m1s is out of range (5s to 10m0s)"},
		{"lease zero", pgQueue(env + "lease = \"0s\""), "queue.lease", "must be positive"},
		{"lease junk", pgQueue(env + "lease = \"half a minute\""), "queue.lease", "not a duration"},
		{"lease number", pgQueue(env + "lease = 30"), "queue.lease", "duration string"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			requireError(t, parseErrors(t, f.Config(tt.overrides)), tt.key, tt.msg)
		})
	}

	// A misspelt backend does not make its keys unknown as well: the one
	// mistake is reported once.
	errs := parseErrors(t, f.Config(map[string]string{"queue": "[queue]\nbackend = \"postgress\"\n" + env + "lease = \"1m\""}))
	if len(errs) != 1 || errs[0].Key != "queue.backend" {
		t.Errorf("errors = %v, want only queue.backend", errs)
	}
}

// pgQueueWith is a [queue] table made of the given lines alone.
func pgQueueWith(lines string) map[string]string {
	return map[string]string{"queue": "[queue]\n" + lines}
}

// TestParseConfigQueueDSNNotShown: a connection string that does not
// parse is named by its key, never shown, since it may hold a password;
// one that parses is not shown when the Config is printed or logged.
func TestParseConfigQueueDSNNotShown(t *testing.T) {
	f := configtest.NewFiles(t)
	const secret = "Sw0rdf1sh-7f3a"
	bad := []string{
		// pgx's own error shows this one's password: the space ends it.
		"host=db.internal user=smarthost password=open " + secret + " dbname=mail",
		"postgres://smarthost:" + secret + "@db.internal:port/mail",
		"postgres://smarthost:" + secret + "%zz@db.internal/mail",
		"postgres://smarthost:" + secret + "@[::1/mail",
		"host=db.internal password='" + secret,
		"host=db.internal password=" + secret + " sslmode=sometimes",
		"host=db.internal password=" + secret + " sslmode=verify-full sslrootcert=" + f.Missing,
		"postgres://smarthost@db.internal/mail?password=" + secret + "&connect_timeout=soon",
		"not a connection string " + secret,
	}
	dir := t.TempDir()
	for i, dsn := range bad {
		t.Run(fmt.Sprint("bad dsn ", i), func(t *testing.T) {
			t.Setenv("SMARTHOST_TEST_DSN", dsn)
			file := configtest.WriteFile(t, dir, "dsn", dsn+"\n")
			for _, queue := range []string{"dsn_env = \"SMARTHOST_TEST_DSN\"", "dsn_file = \"" + file + "\""} {
				errs := parseErrors(t, f.Config(pgQueue(queue)))
				key := "queue." + strings.Fields(queue)[0]
				requireError(t, errs, key, "not shown: it may hold a password")
				if strings.Contains(errs.Error(), secret) {
					t.Errorf("case %d, %s: the error shows the password:\n%v", i, key, errs)
				}
			}
		})
	}

	// A valid DSN and another problem: the password is not in the errors.
	t.Setenv("SMARTHOST_TEST_DSN", "postgres://smarthost:"+secret+"@db.internal/mail")
	errs := parseErrors(t, f.Config(pgQueue("dsn_env = \"SMARTHOST_TEST_DSN\"\nlease = \"1s\"")))
	requireError(t, errs, "queue.lease", "out of range")
	if strings.Contains(errs.Error(), secret) {
		t.Errorf("the error shows the password:\n%v", errs)
	}

	cfg := configtest.MustParse(t, f.Config(pgQueue("dsn_env = \"SMARTHOST_TEST_DSN\"")))
	if !strings.Contains(string(cfg.Queue.DSN), secret) {
		t.Fatalf("DSN = %q, want the one from the environment", string(cfg.Queue.DSN))
	}
	var logged bytes.Buffer
	slog.New(slog.NewJSONHandler(&logged, nil)).Info("config", "dsn", cfg.Queue.DSN, "queue", cfg.Queue)
	slog.New(slog.NewTextHandler(&logged, nil)).Info("config", "dsn", cfg.Queue.DSN, "queue", cfg.Queue)
	printed := fmt.Sprintf("%v %+v %#v %s %v %+v", cfg.Queue, cfg.Queue, cfg.Queue, cfg.Queue.DSN, cfg.Queue.DSN, cfg)
	for what, s := range map[string]string{"slog": logged.String(), "fmt": printed} {
		if strings.Contains(s, secret) {
			t.Errorf("%s shows the password: %s", what, s)
		}
		if !strings.Contains(s, "[redacted]") {
			t.Errorf("%s does not mark the hidden DSN: %s", what, s)
		}
	}
}
