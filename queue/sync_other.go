//go:build !linux

package queue

import "os"

// datasync writes f to disk; fdatasync(2) is Linux's.
func datasync(f *os.File) error { return f.Sync() }
