package queue

import (
	"fmt"
	"io/fs"
	"syscall"
)

// fileStamp identifies the state of a file: device, inode, size, and its
// modification and change times to the nanosecond the file system keeps.
func fileStamp(fi fs.FileInfo) string {
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return ""
	}
	return fmt.Sprintf("dev=%d ino=%d size=%d mtime=%d.%09d ctime=%d.%09d",
		st.Dev, st.Ino, st.Size, st.Mtim.Sec, st.Mtim.Nsec, st.Ctim.Sec, st.Ctim.Nsec)
}
