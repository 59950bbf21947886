package config_test

import (
	"testing"
	"time"

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
