package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
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
	// The command name (field 2) may hold spaces; fields after its ')' are fixed.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("%s: unexpected format", path)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 13 { // utime and stime are fields 14 and 15, i.e. f[11], f[12]
		return 0, fmt.Errorf("%s: unexpected format", path)
	}
	var ticks int64
	for _, v := range f[11:13] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("%s: %w", path, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
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
