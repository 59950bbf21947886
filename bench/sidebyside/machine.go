package main

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
)

// Machine describes where a run was made, for the head of the results.
type Machine struct {
	CPU        string // model name
	Cores      int
	RAM        string
	OS         string
	Kernel     string
	Disk       string // device, filesystem and mount of the work folder
	LoadAvg    string // 1, 5, 15 minute load when the run started
	LoadAvgEnd string // and when it ended
	Postfix    string
	OpenDKIM   string
	Go         string
	Smarthost  string
}

// describeMachine gathers the description. Missing pieces read "unknown"
// rather than failing the run.
func describeMachine(tools Tools, smarthost, workDir string) Machine {
	m := Machine{
		CPU:       firstField("/proc/cpuinfo", "model name"),
		Cores:     runtime.NumCPU(),
		RAM:       memTotal(),
		OS:        osRelease(),
		Kernel:    strings.TrimSpace(readString("/proc/sys/kernel/osrelease")),
		Disk:      diskOf(workDir),
		LoadAvg:   loadAvg(),
		Postfix:   "not used",
		OpenDKIM:  "not used",
		Go:        runtime.Version(),
		Smarthost: "not used",
	}
	if smarthost != "" {
		m.Smarthost = strings.TrimPrefix(firstLine(output(smarthost, "version")), "smarthost ")
	}
	if tools.Postconf != "" {
		m.Postfix = firstLine(output(tools.Postconf, "-d", "-h", "mail_version"))
	}
	if tools.OpenDKIM != "" {
		m.OpenDKIM = strings.TrimPrefix(firstLine(output(tools.OpenDKIM, "-V")), "opendkim: OpenDKIM Filter ")
	}
	return m
}

func readString(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return string(b)
}

func output(name string, args ...string) string {
	out, err := exec.Command(name, args...).Output()
	if err != nil {
		return "unknown (" + err.Error() + ")"
	}
	return string(out)
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return strings.TrimSpace(line)
}

// firstField returns the value of the first "key : value" line of a
// /proc file such as cpuinfo.
func firstField(path, key string) string {
	f, err := os.Open(path)
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == key {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}

func memTotal() string {
	v := firstField("/proc/meminfo", "MemTotal")
	kb, err := strconv.ParseInt(strings.TrimSuffix(v, " kB"), 10, 64)
	if err != nil {
		return v
	}
	return fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20))
}

func osRelease() string {
	for line := range strings.Lines(readString("/etc/os-release")) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "PRETTY_NAME="); ok {
			return strings.Trim(v, `"`)
		}
	}
	return "unknown"
}

func loadAvg() string {
	f := strings.Fields(readString("/proc/loadavg"))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// diskOf names the mount that holds path, from /proc/self/mountinfo:
// the source device, the filesystem type, whether the device is
// rotational, and the mount point.
func diskOf(path string) string {
	abs, err := filepath.Abs(path)
	if err != nil {
		return "unknown"
	}
	var best struct {
		mount, fstype, source, devno string
	}
	for line := range strings.Lines(readString("/proc/self/mountinfo")) {
		// ID parent major:minor root mount-point options ... - fstype source super-options
		pre, post, ok := strings.Cut(line, " - ")
		if !ok {
			continue
		}
		f, g := strings.Fields(pre), strings.Fields(post)
		if len(f) < 5 || len(g) < 2 {
			continue
		}
		mount := f[4]
		if (abs == mount || strings.HasPrefix(abs, strings.TrimSuffix(mount, "/")+"/")) && len(mount) >= len(best.mount) {
			best.mount, best.devno, best.fstype, best.source = mount, f[2], g[0], g[1]
		}
	}
	if best.mount == "" {
		return "unknown"
	}
	s := fmt.Sprintf("%s (%s) mounted on %s", best.source, best.fstype, best.mount)
	if rot := rotational(best.devno); rot != "" {
		s += ", " + rot
	}
	var st syscall.Statfs_t
	if syscall.Statfs(abs, &st) == nil {
		s += fmt.Sprintf(", %.0f GiB free", float64(st.Bavail)*float64(st.Bsize)/(1<<30))
	}
	return s
}

// rotational tells "SSD/virtual" or "rotational" from the block device's
// queue/rotational flag (a partition's is its disk's).
func rotational(devno string) string {
	dev := filepath.Join("/sys/dev/block", devno)
	for _, p := range []string{filepath.Join(dev, "queue", "rotational"), filepath.Join(dev, "..", "queue", "rotational")} {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		if bytes.Equal(bytes.TrimSpace(b), []byte("1")) {
			return "rotational"
		}
		return "non-rotational"
	}
	return ""
}
