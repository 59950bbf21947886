package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"
)

// clockTicks is USER_HZ, the unit of the CPU times in /proc/PID/stat. The
// kernel exports 100 on every architecture Go supports (sysconf(_SC_CLK_TCK)).
const clockTicks = 100

// procStat is the part of /proc/PID/stat (proc(5)) the benchmark uses.
type procStat struct {
	PID, PPID int
	State     byte
	// Start is the start time in clock ticks since boot; with PID it
	// names a process without ambiguity across PID reuse.
	Start uint64
	// CPUTicks is utime+stime+cutime+cstime: the process's own CPU and
	// that of every child it has reaped, so a short-lived Postfix daemon
	// still counts after it exits and master waits for it.
	CPUTicks uint64
	RSSPages int64
}

// parseStat parses the contents of /proc/PID/stat. The command name is in
// parentheses and may itself hold spaces and parentheses, so the fields
// are counted from the last ')'.
func parseStat(data []byte) (procStat, error) {
	open := bytes.IndexByte(data, '(')
	closing := bytes.LastIndexByte(data, ')')
	if open < 1 || closing < open {
		return procStat{}, errors.New("stat: no command name")
	}
	var st procStat
	pid, err := strconv.Atoi(string(bytes.TrimSpace(data[:open])))
	if err != nil {
		return procStat{}, fmt.Errorf("stat: pid: %w", err)
	}
	st.PID = pid
	// Fields after the name, numbered as in proc(5): 3 state, 4 ppid,
	// 14 utime, 15 stime, 16 cutime, 17 cstime, 22 starttime, 24 rss.
	fields := bytes.Fields(data[closing+1:])
	if len(fields) < 22 {
		return procStat{}, fmt.Errorf("stat: %d fields after the name", len(fields))
	}
	field := func(n int) []byte { return fields[n-3] }
	num := func(n int) (int64, error) {
		v, err := strconv.ParseInt(string(field(n)), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("stat: field %d: %w", n, err)
		}
		return v, nil
	}
	if len(field(3)) != 1 {
		return procStat{}, errors.New("stat: bad state")
	}
	st.State = field(3)[0]
	var vals [5]int64
	for i, n := range []int{4, 14, 15, 16, 17} {
		if vals[i], err = num(n); err != nil {
			return procStat{}, err
		}
	}
	st.PPID = int(vals[0])
	st.CPUTicks = uint64(vals[1] + vals[2] + vals[3] + vals[4])
	start, err := num(22)
	if err != nil {
		return procStat{}, err
	}
	st.Start = uint64(start)
	if st.RSSPages, err = num(24); err != nil {
		return procStat{}, err
	}
	return st, nil
}

// readStat reads one process's stat file.
func readStat(pid int) (procStat, error) {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
	if err != nil {
		return procStat{}, err
	}
	return parseStat(data)
}

// allProcs reads the stat of every process visible in /proc. Processes
// that exit during the scan are skipped.
func allProcs() ([]procStat, error) {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	out := make([]procStat, 0, len(entries))
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readStat(pid)
		if err != nil {
			continue
		}
		out = append(out, st)
	}
	return out, nil
}

// procID names a process across PID reuse.
type procID struct {
	PID   int
	Start uint64
}

// treeOf returns the processes of all that descend from the roots
// (roots included), matching each root by PID and start time.
func treeOf(all []procStat, roots []procID) []procStat {
	children := make(map[int][]procStat, len(all))
	byPID := make(map[int]procStat, len(all))
	for _, p := range all {
		children[p.PPID] = append(children[p.PPID], p)
		byPID[p.PID] = p
	}
	var out []procStat
	seen := make(map[int]bool)
	var walk func(p procStat)
	walk = func(p procStat) {
		if seen[p.PID] {
			return
		}
		seen[p.PID] = true
		out = append(out, p)
		for _, c := range children[p.PID] {
			walk(c)
		}
	}
	for _, r := range roots {
		if p, ok := byPID[r.PID]; ok && p.Start == r.Start {
			walk(p)
		}
	}
	return out
}

// pssBytes is the proportional set size of a process from
// /proc/PID/smaps_rollup: shared pages are divided among the processes
// that map them, so a tree of forked daemons (Postfix) is not charged
// once per process for the same libraries. It falls back to RSS when
// the file cannot be read.
func pssBytes(p procStat) int64 {
	data, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(p.PID), "smaps_rollup"))
	if err == nil {
		for line := range bytes.Lines(data) {
			if rest, ok := bytes.CutPrefix(line, []byte("Pss:")); ok {
				f := bytes.Fields(rest)
				if len(f) >= 1 {
					if kb, err := strconv.ParseInt(string(f[0]), 10, 64); err == nil {
						return kb << 10
					}
				}
			}
		}
	}
	return p.RSSPages * int64(os.Getpagesize())
}

// Process is a child the benchmark started. Every Process is registered
// with a Supervisor, which stops it by PID.
type Process struct {
	Name string
	PID  int
	// Start is the kernel start time, to tell this process from a later
	// one that reuses its PID.
	Start uint64
	cmd   *exec.Cmd
	done  chan struct{}
	err   error // the exit status, valid once done is closed
}

// ID returns the process's identity for tree walks.
func (p *Process) ID() procID { return procID{PID: p.PID, Start: p.Start} }

// Done is closed when the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Err is the exit status once Done is closed (nil for exit 0).
func (p *Process) Err() error {
	<-p.done
	return p.err
}

// Supervisor starts child processes and stops every one of them, with
// the processes they forked, by PID.
type Supervisor struct {
	Log *slog.Logger
	// Grace is how long a process gets between SIGTERM and SIGKILL.
	Grace time.Duration

	mu      sync.Mutex
	procs   []*Process
	pending sync.WaitGroup // StopLater calls in progress
}

// Start starts cmd as a registered Process. Unless cmd sets its own
// SysProcAttr, the child gets a process group of its own, so that a
// terminal's Ctrl-C reaches only the benchmark, which then stops its
// children in order; and it is sent SIGTERM should the benchmark die
// without cleaning up.
func (s *Supervisor) Start(name string, cmd *exec.Cmd) (*Process, error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Process{Name: name, PID: cmd.Process.Pid, cmd: cmd, done: make(chan struct{})}
	if st, err := readStat(p.PID); err == nil {
		p.Start = st.Start
	}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	s.mu.Lock()
	s.procs = append(s.procs, p)
	s.mu.Unlock()
	s.Log.Debug("started", "process", name, "pid", p.PID)
	return p, nil
}

// Stop ends p and every process descended from it: SIGTERM to p by PID,
// then, after Grace, SIGKILL to p and to each descendant still alive,
// each by its PID (checked against its start time).
func (s *Supervisor) Stop(p *Process) {
	defer s.forget(p)
	began := time.Now()
	defer func() { s.Log.Debug("stopped", "process", p.Name, "pid", p.PID, "took", time.Since(began)) }()
	select {
	case <-p.done:
		return
	default:
	}
	var desc []procStat
	if all, err := allProcs(); err == nil {
		desc = treeOf(all, []procID{p.ID()})
	}
	_ = syscall.Kill(p.PID, syscall.SIGTERM)
	deadline := time.Now().Add(s.Grace)
	select {
	case <-p.done:
	case <-time.After(s.Grace):
		s.Log.Warn("process did not stop on SIGTERM; killing", "process", p.Name, "pid", p.PID)
		_ = syscall.Kill(p.PID, syscall.SIGKILL)
		<-p.done
	}
	// The root's own children (Postfix's daemons) get SIGTERM from it;
	// wait for them too, so that no process of one run outlives it.
	for _, d := range desc {
		if d.PID == p.PID {
			continue
		}
		for alive(d) {
			if time.Now().After(deadline) {
				s.Log.Warn("descendant still running; killing", "process", p.Name, "pid", d.PID)
				_ = syscall.Kill(d.PID, syscall.SIGKILL)
				deadline = time.Now().Add(s.Grace)
			}
			time.Sleep(20 * time.Millisecond) // polling a process we cannot wait for
		}
	}
}

// alive tells whether the process d is still running (not a zombie and
// not replaced by another with the same PID).
func alive(d procStat) bool {
	st, err := readStat(d.PID)
	if err != nil {
		return !errors.Is(err, fs.ErrNotExist)
	}
	return st.Start == d.Start && st.State != 'Z' && st.State != 'X'
}

func (s *Supervisor) forget(p *Process) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, q := range s.procs {
		if q == p {
			s.procs = append(s.procs[:i], s.procs[i+1:]...)
			return
		}
	}
}

// StopLater stops p as Stop does, in the background: for a process that
// takes seconds to exit when idle. StopAll waits for it.
func (s *Supervisor) StopLater(p *Process) {
	s.pending.Go(func() { s.Stop(p) })
}

// StopAll stops every registered process, the most recently started
// first (a relay before its upstream), and waits for StopLater calls.
func (s *Supervisor) StopAll() {
	defer s.pending.Wait()
	for {
		s.mu.Lock()
		if len(s.procs) == 0 {
			s.mu.Unlock()
			return
		}
		p := s.procs[len(s.procs)-1]
		s.mu.Unlock()
		s.Stop(p)
	}
}

// Sampler follows the CPU time and memory of the process trees under a
// set of roots: every process they forked, for as long as it lives.
type Sampler struct {
	roots    []procID
	interval time.Duration

	mu      sync.Mutex
	peak    int64 // highest tree PSS since the last ResetPeak
	peakRSS int64 // highest tree RSS since the last ResetPeak
	stop    chan struct{}
	done    chan struct{}
}

// NewSampler starts sampling the trees under roots every interval.
func NewSampler(roots []*Process, interval time.Duration) *Sampler {
	s := &Sampler{interval: interval, stop: make(chan struct{}), done: make(chan struct{})}
	for _, r := range roots {
		s.roots = append(s.roots, r.ID())
	}
	s.sample()
	go s.loop()
	return s
}

func (s *Sampler) loop() {
	defer close(s.done)
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.sample()
		}
	}
}

// sample reads the trees once and returns their CPU time in clock ticks.
func (s *Sampler) sample() uint64 {
	all, err := allProcs()
	if err != nil {
		return 0
	}
	tree := treeOf(all, s.roots)
	var cpu uint64
	var mem, rss int64
	for _, p := range tree {
		cpu += p.CPUTicks
		if p.State != 'Z' {
			mem += pssBytes(p)
			rss += p.RSSPages * int64(os.Getpagesize())
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peak = max(s.peak, mem)
	s.peakRSS = max(s.peakRSS, rss)
	return cpu
}

// CPU samples the trees now and returns their total CPU time so far.
// Call it when the relay is idle: while a child exits, a scan can miss
// it (reaped after its parent was read) or, should its PID sort below
// its parent's, count it twice.
func (s *Sampler) CPU() time.Duration {
	return time.Duration(s.sample()) * time.Second / clockTicks
}

// ResetPeak starts a new peak-memory window.
func (s *Sampler) ResetPeak() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peak, s.peakRSS = 0, 0
}

// Peak returns the highest total PSS of the trees since ResetPeak,
// sampling once more now.
func (s *Sampler) Peak() int64 {
	s.sample()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak
}

// PeakRSS returns the highest total RSS of the trees since ResetPeak
// (shared pages counted once per process), sampling once more now.
func (s *Sampler) PeakRSS() int64 {
	s.sample()
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peakRSS
}

// Close stops sampling.
func (s *Sampler) Close() {
	close(s.stop)
	<-s.done
}
