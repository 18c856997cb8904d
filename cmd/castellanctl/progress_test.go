package main

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeClock is a clock a test moves by hand.
type fakeClock struct{ t time.Time }

func (c *fakeClock) now() time.Time          { return c.t }
func (c *fakeClock) advance(d time.Duration) { c.t = c.t.Add(d) }

func TestProgressLine(t *testing.T) {
	start := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name    string
		unit    string
		total   int64
		done    int64
		elapsed time.Duration
		want    string
	}{
		{"nothing counted yet", "records", 0, 0, 3 * time.Second, "x: 3s elapsed"},
		{"count and rate", "records", 0, 12000, 3 * time.Second, "x: 12,000 records, 4,000 records/s"},
		{"with a total", "records", 50000, 12000, 3 * time.Second, "x: 12,000 of 50,000 records (24%), 4,000 records/s, 10s left"},
		{"done", "records", 1000, 1000, 2 * time.Second, "x: 1,000 of 1,000 records (100%), 500 records/s"},
		{"past an estimated total", "records", 1000, 1500, time.Second, "x: 1,500 of 1,000 records (100%), 1,500 records/s"},
		{"bytes", "bytes", 120 << 20, 45 << 20, 2 * time.Second, "x: 45.0 MiB of 120.0 MiB (37%), 22.5 MiB/s, 3s left"},
		{"small bytes", "bytes", 0, 512, time.Second, "x: 512 B, 512 B/s"},
		{"millions", "records", 0, 1234567, time.Second, "x: 1,234,567 records, 1,234,567 records/s"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			clk := &fakeClock{t: start}
			p := newProgress(true, &bytes.Buffer{}, clk.now, "x", tc.unit)
			p.SetTotal(tc.total)
			p.done = tc.done
			if got := p.line(start.Add(tc.elapsed)); got != tc.want {
				t.Errorf("line = %q, want %q", got, tc.want)
			}
		})
	}
}

func TestProgressDrawing(t *testing.T) {
	clk := &fakeClock{t: time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)}
	var out bytes.Buffer
	p := newProgress(true, &out, clk.now, "audit export", "records")
	p.SetTotal(100)
	clk.advance(time.Second)
	p.Add(10) // first draw
	p.Add(10) // too soon: not drawn
	if got, want := out.String(), "\raudit export: 10 of 100 records (10%), 10 records/s, 9s left"; got != want {
		t.Fatalf("after two adds within %v: %q, want %q", progressInterval, got, want)
	}
	out.Reset()
	clk.advance(time.Second)
	p.Add(1000) // past the total: the line gets shorter and is padded over the old one
	first := "audit export: 10 of 100 records (10%), 10 records/s, 9s left"
	line := "audit export: 1,020 of 100 records (100%), 510 records/s"
	if got, want := out.String(), "\r"+line+strings.Repeat(" ", len(first)-len(line)); got != want {
		t.Fatalf("redraw: %q, want %q", got, want)
	}
	out.Reset()
	p.Done()
	if got, want := out.String(), "\r"+strings.Repeat(" ", len(line))+"\r"; got != want {
		t.Errorf("Done: %q, want %q", got, want)
	}
	out.Reset()
	clk.advance(time.Second)
	p.Add(1)
	p.Tick()
	p.Done()
	if out.Len() != 0 {
		t.Errorf("drew after Done: %q", out.String())
	}
}

func TestProgressDisabledIsQuiet(t *testing.T) {
	var p *progress = newProgress(false, os.Stderr, time.Now, "x", "records")
	if p != nil {
		t.Fatal("a disabled progress is not nil")
	}
	p.SetTotal(5)
	p.Add(1)
	p.Tick()
	p.Done()
	stop := make(chan struct{})
	close(stop)
	p.whileWaiting(stop)
}

// openPTY opens a new pseudo-terminal pair through /dev/ptmx.
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	t.Cleanup(func() { _ = m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Skipf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Skipf("ptsname: %v", err)
	}
	s, err := os.OpenFile(filepath.Join("/dev/pts", strconv.Itoa(n)), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("open the pty's slave: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return m, s
}

func TestProgressEnabled(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	_, pty := openPTY(t)
	for _, tc := range []struct {
		name string
		mode string
		w    io.Writer
		want bool
	}{
		{"auto, a buffer", progressAuto, &bytes.Buffer{}, false},
		{"auto, a pipe", progressAuto, w, false},
		{"auto, a terminal", progressAuto, pty, true},
		{"never, a terminal", progressNever, pty, false},
		{"always, a pipe", progressAlways, w, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := progressEnabled(tc.mode, tc.w)
			if err != nil || got != tc.want {
				t.Errorf("progressEnabled = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
	if _, err := progressEnabled("sometimes", w); err == nil {
		t.Error("--progress sometimes: no error")
	}
}

// TestProgressCommands runs audit export, verify and prune against a real
// server: with --progress always they draw the progress line on stderr;
// with stderr not a terminal (auto) they print exactly what they did before.
func TestProgressCommands(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	startServer(t, data)
	for i := range 3 {
		issue(t, data, "spiffe://cluster.local/ns/progress/sa/app"+strconv.Itoa(i))
	}
	export := filepath.Join(t.TempDir(), "export.jsonl")
	for _, tc := range []struct {
		args []string
		line string // drawn with --progress always
	}{
		{[]string{"audit", "export", "--out", export}, "\raudit export: "},
		{[]string{"audit", "verify"}, "\raudit verify (on the server): 0s elapsed"},
		{[]string{"audit", "verify", "--file", export, "--checkpoint-key", filepath.Join(data, "audit-checkpoint-key.pub.pem")},
			"\raudit verify " + export + ": "},
		{[]string{"audit", "prune", "--before", "2000-01-01"}, "\raudit prune (on the server): 0s elapsed"},
	} {
		t.Run(strings.Join(tc.args[:2], " "), func(t *testing.T) {
			_, quiet, err := ctl(data, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(quiet, "\r") {
				t.Errorf("progress drawn into a buffer (not a terminal): %q", quiet)
			}
			_, loud, err := ctl(data, append([]string{"--progress", "always"}, tc.args...)...)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(loud, tc.line) {
				t.Errorf("stderr with --progress always: %q, want %q", loud, tc.line)
			}
			if strings.HasPrefix(tc.args[1], "export") && (!strings.Contains(loud, "records/s") || !strings.Contains(loud, "records (")) {
				t.Errorf("export progress without a total or a rate: %q", loud)
			}
		})
	}
}
