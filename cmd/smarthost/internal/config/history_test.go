package config_test

import (
	"strings"
	"testing"
	"time"

	"smarthost/cmd/smarthost/internal/config"
	"smarthost/cmd/smarthost/internal/config/configtest"
)

func TestParseConfigHistory(t *testing.T) {
	f := configtest.NewFiles(t)
	for _, tc := range []struct {
		table string
		want  time.Duration
		err   string
	}{
		{"", 168 * time.Hour, ""},
		{"[history]", 168 * time.Hour, ""},
		{"[history]\nretention = \"24h\"", 24 * time.Hour, ""},
		{"[history]\nretention = \"0\"", 0, ""},
		{"[history]\nretention = \"-1h\"", 0, "retention"},
		{"[history]\nretention = \"a week\"", 0, "retention"},
		{"[history]\nretention = 7", 0, "retention"},
		{"[history]\nrentention = \"24h\"", 0, "rentention"},
	} {
		text := f.Config(map[string]string{"http": tc.table})
		cfg, err := config.Parse([]byte(text), "test.toml")
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%q: %v", tc.table, err)
		case tc.err == "" && cfg.HistoryRetention != tc.want:
			t.Errorf("%q: retention %v, want %v", tc.table, cfg.HistoryRetention, tc.want)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%q: error %v, want one naming %s", tc.table, err, tc.err)
		}
	}
}
