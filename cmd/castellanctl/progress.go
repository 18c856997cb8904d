package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"

	"golang.org/x/term"
)

// The values of --progress.
const (
	progressAuto   = "auto"   // on when stderr is a terminal
	progressAlways = "always" // on, even into a pipe or file
	progressNever  = "never"
)

// progressEnabled decides whether long operations report progress on w
// (stderr): with auto, only when w is a terminal, so that piped or
// redirected output stays clean.
func progressEnabled(mode string, w io.Writer) (bool, error) {
	switch mode {
	case progressAlways:
		return true, nil
	case progressNever:
		return false, nil
	case progressAuto, "":
		f, ok := w.(*os.File)
		return ok && term.IsTerminal(int(f.Fd())), nil
	}
	return false, fmt.Errorf("--progress must be auto, always or never, got %q", mode)
}

// progressInterval is how often the line is redrawn at most.
const progressInterval = 200 * time.Millisecond

// progress draws one status line of a long operation on a terminal:
// how much is done, the rate and, when the total is known, the time left.
// A disabled progress (nil, or enabled false) does nothing, so callers
// never branch on it. It is safe for concurrent use.
type progress struct {
	w     io.Writer
	now   func() time.Time
	what  string // "audit export"
	unit  string // "records" or "bytes"
	total int64  // 0: unknown

	mu     sync.Mutex
	start  time.Time
	drawn  time.Time
	done   int64
	width  int // of the last line drawn, to blank it
	closed bool
}

// newProgress returns the progress of what, counted in unit, drawn on w
// when enabled; nil (which does nothing) otherwise.
func newProgress(enabled bool, w io.Writer, now func() time.Time, what, unit string) *progress {
	if !enabled {
		return nil
	}
	return &progress{w: w, now: now, what: what, unit: unit, start: now()}
}

// SetTotal sets how much there is to do (an estimate is fine).
func (p *progress) SetTotal(n int64) {
	if p == nil {
		return
	}
	p.mu.Lock()
	p.total = n
	p.mu.Unlock()
}

// Add counts n more done and redraws when the last draw is old enough.
func (p *progress) Add(n int64) {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += n
	if now := p.now(); now.Sub(p.drawn) >= progressInterval {
		p.draw(now)
	}
}

// Tick redraws (for an operation with nothing to count, the time elapsed).
func (p *progress) Tick() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.draw(p.now())
}

// Done blanks the line, leaving the terminal as it was for the result.
func (p *progress) Done() {
	if p == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.width > 0 && !p.closed {
		_, _ = io.WriteString(p.w, "\r"+strings.Repeat(" ", p.width)+"\r") // best effort: progress is decoration
	}
	p.closed = true
}

func (p *progress) draw(now time.Time) {
	if p.closed {
		return
	}
	p.drawn = now
	line := p.line(now)
	pad := ""
	if n := p.width - len(line); n > 0 {
		pad = strings.Repeat(" ", n)
	}
	p.width = len(line)
	_, _ = io.WriteString(p.w, "\r"+line+pad) // best effort: progress is decoration
}

// line renders the status: "audit export: 12,000 of 50,000 records (24%),
// 4,000 records/s, 9s left"; without a total, the count and rate; with
// nothing counted yet, the time elapsed.
func (p *progress) line(now time.Time) string {
	elapsed := now.Sub(p.start)
	if p.done == 0 {
		return fmt.Sprintf("%s: %s elapsed", escape(p.what), elapsed.Round(time.Second))
	}
	unit := "" // bytes carry their unit in each amount
	if p.unit != "bytes" {
		unit = " " + p.unit
	}
	var b strings.Builder
	b.WriteString(escape(p.what) + ": " + p.amount(p.done))
	if p.total > 0 {
		b.WriteString(" of " + p.amount(p.total))
	}
	b.WriteString(unit)
	if p.total > 0 {
		b.WriteString(fmt.Sprintf(" (%d%%)", min(100, p.done*100/p.total)))
	}
	secs := elapsed.Seconds()
	if secs <= 0 {
		return b.String()
	}
	rate := float64(p.done) / secs
	b.WriteString(", " + p.amount(int64(rate)) + unit + "/s")
	if p.total > p.done && rate > 0 {
		left := time.Duration(float64(p.total-p.done) / rate * float64(time.Second))
		b.WriteString(", " + left.Round(time.Second).String() + " left")
	}
	return b.String()
}

// amount renders n: bytes in KiB/MiB/GiB with their unit, counts with
// thousands separators.
func (p *progress) amount(n int64) string {
	if p.unit == "bytes" {
		const k = 1024
		switch {
		case n >= k*k*k:
			return fmt.Sprintf("%.1f GiB", float64(n)/(k*k*k))
		case n >= k*k:
			return fmt.Sprintf("%.1f MiB", float64(n)/(k*k))
		case n >= k:
			return fmt.Sprintf("%.1f KiB", float64(n)/k)
		}
		return fmt.Sprintf("%d B", n)
	}
	s := fmt.Sprint(n)
	for i := len(s) - 3; i > 0 && s[i-1] != '-'; i -= 3 {
		s = s[:i] + "," + s[i:]
	}
	return s
}

// whileWaiting redraws p every interval until stop is closed: the elapsed
// time of a call that reports nothing until it ends.
func (p *progress) whileWaiting(stop <-chan struct{}) {
	if p == nil {
		return
	}
	t := time.NewTicker(time.Second)
	defer t.Stop()
	p.Tick()
	for {
		select {
		case <-stop:
			return
		case <-t.C:
			p.Tick()
		}
	}
}

// countingReader counts what is read through it into a progress.
type countingReader struct {
	r io.Reader
	p *progress
}

func (c countingReader) Read(b []byte) (int, error) {
	n, err := c.r.Read(b)
	c.p.Add(int64(n))
	return n, err
}
