package main

import (
	"bufio"
	"bytes"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	// Fields after the name: state ppid pgrp session tty tpgid flags
	// minflt cminflt majflt cmajflt utime stime cutime cstime priority
	// nice threads itrealvalue starttime vsize rss ...
	tail := " S 7 8 8 0 -1 4194560 10 0 0 0 11 12 13 14 20 0 1 0 999 1000000 55 18446744073709551615"
	tests := []struct {
		name string
		line string
		want procStat
		err  bool
	}{
		{"plain", "42 (smtpd)" + tail, procStat{PID: 42, PPID: 7, State: 'S', Start: 999, CPUTicks: 11 + 12 + 13 + 14, RSSPages: 55}, false},
		{"name with spaces and parens", "43 (a) b (c)" + tail, procStat{PID: 43, PPID: 7, State: 'S', Start: 999, CPUTicks: 50, RSSPages: 55}, false},
		{"no name", "44 smtpd" + tail, procStat{}, true},
		{"short", "45 (x) S 1 2", procStat{}, true},
		{"bad number", "46 (x) S one" + tail[4:], procStat{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseStat([]byte(tt.line + "\n"))
			if (err != nil) != tt.err {
				t.Fatalf("parseStat err = %v, want error %v", err, tt.err)
			}
			if got != tt.want {
				t.Errorf("parseStat = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestTreeOf(t *testing.T) {
	all := []procStat{
		{PID: 1, PPID: 0, Start: 1},
		{PID: 10, PPID: 1, Start: 100},  // root
		{PID: 11, PPID: 10, Start: 101}, // child
		{PID: 12, PPID: 11, Start: 102}, // grandchild
		{PID: 20, PPID: 1, Start: 200},  // unrelated
		{PID: 30, PPID: 1, Start: 300},  // a root's PID reused by another process
		{PID: 31, PPID: 30, Start: 301},
	}
	got := treeOf(all, []procID{{PID: 10, Start: 100}, {PID: 30, Start: 299}})
	var pids []int
	for _, p := range got {
		pids = append(pids, p.PID)
	}
	if want := []int{10, 11, 12}; !slices.Equal(pids, want) {
		t.Errorf("tree PIDs = %v, want %v", pids, want)
	}
}

func testSupervisor(t *testing.T) *Supervisor {
	t.Helper()
	s := &Supervisor{Log: slog.New(slog.DiscardHandler), Grace: 2 * time.Second}
	t.Cleanup(s.StopAll)
	return s
}

// startShell starts sh -c script with its stdin and stdout as pipes.
func startShell(t *testing.T, s *Supervisor, script string) (*Process, io.WriteCloser, *bufio.Reader) {
	t.Helper()
	cmd := exec.Command("sh", "-c", script)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	p, err := s.Start("sh", cmd)
	if err != nil {
		t.Fatal(err)
	}
	return p, in, bufio.NewReader(out)
}

// A child that burns CPU and exits still counts once its parent has
// reaped it: that is how the CPU of Postfix's short-lived daemons is
// charged to the master process tree.
func TestSamplerCountsReapedChildren(t *testing.T) {
	s := testSupervisor(t)
	// The child loops in its own shell; the parent waits for it, says
	// "reaped" and then blocks on stdin, idle.
	p, in, out := startShell(t, s, `sh -c 'i=0; while [ $i -lt 500000 ]; do i=$((i+1)); done'; echo reaped; read x`)
	defer in.Close()
	sampler := NewSampler([]*Process{p}, 20*time.Millisecond)
	defer sampler.Close()
	line, err := out.ReadString('\n')
	if err != nil || line != "reaped\n" {
		t.Fatalf("read %q, %v", line, err)
	}
	total := sampler.CPU()
	own, err := readStat(p.PID)
	if err != nil {
		t.Fatal(err)
	}
	// The root's cutime holds the child; the tree's total includes it.
	if total < 100*time.Millisecond {
		t.Errorf("tree CPU = %v after a child burned a few hundred ms", total)
	}
	data, err := readStatFields(p.PID)
	if err != nil {
		t.Fatal(err)
	}
	if utime, stime := data[0], data[1]; time.Duration(utime+stime)*time.Second/clockTicks >= total {
		t.Errorf("root's own CPU %d+%d ticks is all of the tree's %v; the child's is missing", utime, stime, total)
	}
	if own.CPUTicks == 0 {
		t.Error("root has no CPU ticks, with its reaped child's")
	}
	if mem := sampler.Peak(); mem <= 0 {
		t.Errorf("peak memory %d", mem)
	}
}

// readStatFields returns utime and stime alone.
func readStatFields(pid int) ([2]uint64, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return [2]uint64{}, err
	}
	f := strings.Fields(string(data[bytes.LastIndexByte(data, ')')+1:]))
	u, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return [2]uint64{u, st}, nil
}

// Stop ends the root and, after the grace period, any descendant that
// ignored the root's end: none outlives it.
func TestSupervisorStopsDescendants(t *testing.T) {
	s := testSupervisor(t)
	s.Grace = 500 * time.Millisecond
	// Two grandchildren that ignore SIGTERM and outlive their parent.
	p, in, out := startShell(t, s, `(trap '' TERM; exec sleep 300) & echo $!; (trap '' TERM; exec sleep 300) & echo $!; wait`)
	defer in.Close()
	var kids []procStat
	for range 2 {
		line, err := out.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		pid, err := strconv.Atoi(strings.TrimSpace(line))
		if err != nil {
			t.Fatal(err)
		}
		st, err := readStat(pid)
		if err != nil {
			t.Fatal(err)
		}
		kids = append(kids, st)
	}
	s.Stop(p)
	select {
	case <-p.Done():
	default:
		t.Fatal("root still running after Stop")
	}
	for _, k := range kids {
		if alive(k) {
			t.Errorf("descendant %d still running after Stop", k.PID)
			_ = syscall.Kill(k.PID, syscall.SIGKILL)
		}
	}
	s.mu.Lock()
	n := len(s.procs)
	s.mu.Unlock()
	if n != 0 {
		t.Errorf("%d processes still registered", n)
	}
}
