//go:build !windows && !plan9 && !solaris && !aix && !android

package queue

import (
	"errors"
	"os"
	"syscall"
	"time"
)

// lockFile takes bbolt's lock on f, as bbolt takes it (flock: exclusive
// to write, shared to read), waiting up to timeout; ErrLocked if another
// process holds it. Open takes it before it checks the file and hands f
// to bbolt, whose own flock on the same descriptor then succeeds, so that
// no other process can open the file between the check and bbolt.
func lockFile(f *os.File, exclusive bool, timeout time.Duration) error {
	how := syscall.LOCK_SH
	if exclusive {
		how = syscall.LOCK_EX
	}
	deadline := time.Now().Add(timeout)
	for {
		err := syscall.Flock(int(f.Fd()), how|syscall.LOCK_NB)
		if !errors.Is(err, syscall.EWOULDBLOCK) {
			return err
		}
		if time.Now().After(deadline) {
			return ErrLocked
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// mapFile maps the size bytes of f read-only, so that the check reads its
// pages without a system call and a copy each; it returns nil where the
// file cannot be mapped (the check then reads it). Reading a page of the
// map past the end of the file is a fault: the check only reads within
// size, with faults turned into panics in case the file shrinks meanwhile
// (checkBoltFile).
func mapFile(f *os.File, size int64) (data []byte, unmap func()) {
	if size <= 0 || int64(int(size)) != size {
		return nil, func() {}
	}
	data, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return nil, func() {}
	}
	return data, func() { syscall.Munmap(data) }
}
