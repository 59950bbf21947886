package config

import (
	"time"
)

// DefaultHistoryRetention is [history] retention: a week, long enough to
// answer "what happened to my mail last Monday?".
const DefaultHistoryRetention = 168 * time.Hour

// history reads the [history] table: how long the events of a message are
// kept after it left the queue; "0" keeps none.
func (p *parser) history(t *table) time.Duration {
	d := DefaultHistoryRetention
	if s, ok := t.str("retention"); ok {
		if s == "0" {
			d = 0
		} else {
			d = t.duration("retention", DefaultHistoryRetention)
		}
	}
	t.done()
	return d
}
