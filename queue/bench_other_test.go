//go:build !linux

package queue

import "errors"

// dropPageCache is only implemented on Linux.
func dropPageCache(string) error { return errors.New("not supported on this system") }
