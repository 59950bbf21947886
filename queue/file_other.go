//go:build windows || plan9 || solaris || aix || android

package queue

import (
	"os"
	"time"
)

// lockFile does nothing here: bbolt takes its own lock when it opens the
// file, after the check.
func lockFile(*os.File, bool, time.Duration) error { return nil }

// mapFile does not map here: the check reads the file.
func mapFile(*os.File, int64) ([]byte, func()) { return nil, func() {} }
