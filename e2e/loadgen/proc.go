package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat CPU times: 100 on every
// Linux architecture Go supports.
const clockTicks = 100

// readCPU returns the user+system CPU time of process pid from /proc.
func readCPU(pid int) (time.Duration, error) {
	if pid <= 0 {
		return 0, errors.New("no process id")
	}
	return cpuFromStat(fmt.Sprintf("/proc/%d/stat", pid))
}

// readSelfCPU returns this process's user+system CPU time.
func readSelfCPU() (time.Duration, error) { return cpuFromStat("/proc/self/stat") }

func cpuFromStat(path string) (time.Duration, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	st, err := parseStat(b)
	if err != nil {
		return 0, fmt.Errorf("%s: %w", path, err)
	}
	return ticksToDuration(st.utime + st.stime), nil
}

func ticksToDuration(ticks int64) time.Duration {
	return time.Duration(ticks) * time.Second / clockTicks
}

// procStat is what the load generator reads of /proc/<pid>/stat: the parent
// and the CPU times in clock ticks, the process's own (utime, stime) and
// those of its children it has waited for (cutime, cstime).
type procStat struct {
	ppid                         int
	utime, stime, cutime, cstime int64
}

var errStatFormat = errors.New("unexpected /proc stat format")

func parseStat(b []byte) (procStat, error) {
	// The command name (field 2) may hold spaces; fields after its ')' are fixed.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return procStat{}, errStatFormat
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state): ppid is f[1], utime..cstime are fields 14..17.
	if len(f) < 15 {
		return procStat{}, errStatFormat
	}
	var st procStat
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return procStat{}, fmt.Errorf("%w: ppid: %w", errStatFormat, err)
	}
	st.ppid = ppid
	for j, dst := range []*int64{&st.utime, &st.stime, &st.cutime, &st.cstime} {
		if *dst, err = strconv.ParseInt(f[11+j], 10, 64); err != nil {
			return procStat{}, fmt.Errorf("%w: %w", errStatFormat, err)
		}
	}
	return st, nil
}

// treeCPU returns the CPU time of process pid and all its descendants: each
// live one's own time plus what it has reaped of its exited children (so a
// PostgreSQL backend that came and went is still counted, in the
// postmaster's cutime). Read from procRoot ("/proc").
func treeCPU(procRoot string, pid int) (time.Duration, error) {
	if pid <= 0 {
		return 0, errors.New("no process id")
	}
	paths, err := filepath.Glob(filepath.Join(procRoot, "[0-9]*", "stat"))
	if err != nil {
		return 0, err
	}
	stats := make(map[int]procStat, len(paths))
	for _, path := range paths {
		b, err := os.ReadFile(path)
		if err != nil {
			continue // exited meanwhile
		}
		st, err := parseStat(b)
		if err != nil {
			continue
		}
		p, err := strconv.Atoi(filepath.Base(filepath.Dir(path)))
		if err != nil {
			continue
		}
		stats[p] = st
	}
	if _, ok := stats[pid]; !ok {
		return 0, fmt.Errorf("process %d: not in %s", pid, procRoot)
	}
	var ticks int64
	for p, st := range stats {
		if descends(stats, p, pid) {
			ticks += st.utime + st.stime + st.cutime + st.cstime
		}
	}
	return ticksToDuration(ticks), nil
}

// descends reports whether p is root or one of its descendants in stats.
func descends(stats map[int]procStat, p, root int) bool {
	for range len(stats) + 1 { // bounded: a cycle cannot occur, but a bad read must not loop
		if p == root {
			return true
		}
		st, ok := stats[p]
		if !ok || st.ppid == 0 || st.ppid == p {
			return false
		}
		p = st.ppid
	}
	return false
}

// memorySample is a reading of /proc/<pid>/status.
type memorySample struct {
	at             time.Duration // since the measured phase started
	rssKiB, hwmKiB int64
}

// memorySeries samples a process's resident memory over the run.
type memorySeries struct {
	pid     int
	start   time.Time
	samples []memorySample
}

func newMemorySeries(pid int) *memorySeries { return &memorySeries{pid: pid} }

// sample reads the process's memory now; the zero sample when it cannot.
func (m *memorySeries) sample(now time.Time) memorySample {
	if m.pid <= 0 {
		return memorySample{}
	}
	if m.start.IsZero() {
		m.start = now
	}
	s, err := readMemory(m.pid)
	if err != nil {
		return memorySample{}
	}
	s.at = now.Sub(m.start)
	m.samples = append(m.samples, s)
	return s
}

// summary is one line: first, last, range and peak of the RSS samples.
func (m *memorySeries) summary() string {
	if len(m.samples) == 0 {
		return ""
	}
	lo, hi := m.samples[0].rssKiB, m.samples[0].rssKiB
	for _, s := range m.samples {
		lo, hi = min(lo, s.rssKiB), max(hi, s.rssKiB)
	}
	first, last := m.samples[0], m.samples[len(m.samples)-1]
	return fmt.Sprintf("start %.1f MiB, end %.1f MiB, min %.1f, max %.1f over %d samples; peak since process start (VmHWM) %.1f MiB",
		mib(first.rssKiB), mib(last.rssKiB), mib(lo), mib(hi), len(m.samples), mib(last.hwmKiB))
}

func mib(kib int64) float64 { return float64(kib) / 1024 }

func readMemory(pid int) (memorySample, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return memorySample{}, err
	}
	defer f.Close()
	var s memorySample
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		var dst *int64
		switch k {
		case "VmRSS":
			dst = &s.rssKiB
		case "VmHWM":
			dst = &s.hwmKiB
		default:
			continue
		}
		n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		if err != nil {
			return memorySample{}, fmt.Errorf("/proc/%d/status %s: %w", pid, k, err)
		}
		*dst = n
	}
	return s, sc.Err()
}

// loadAverage returns the first three fields of /proc/loadavg ("" if unreadable),
// so that every result says how busy the machine was.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return ""
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return ""
	}
	return strings.Join(f[:3], " ")
}

// freeAddr returns a loopback address with a port that was free a moment ago.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}
