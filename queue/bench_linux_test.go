package queue

import (
	"fmt"
	"os"
	"syscall"
)

// dropPageCache asks the kernel to drop path's cached pages, so that the
// next read comes from the disk, as after a reboot. It affects this one
// file only.
func dropPageCache(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	// Dirty pages are not dropped: bbolt has fsynced them all by Close.
	const fadvDontNeed = 4 // POSIX_FADV_DONTNEED
	if _, _, errno := syscall.Syscall6(syscall.SYS_FADVISE64, f.Fd(), 0, 0, fadvDontNeed, 0, 0); errno != 0 {
		return fmt.Errorf("fadvise %s: %w", path, errno)
	}
	return nil
}
