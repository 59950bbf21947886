package queue

import (
	"os"
	"syscall"
)

// datasync writes f's data to disk, and of its metadata only what reading
// the data back needs (its size): the journal's entries.
func datasync(f *os.File) error { return syscall.Fdatasync(int(f.Fd())) }
