package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/term"
)

// progressIntervalMin is how often progress is redrawn or logged.
const progressIntervalMin = 500 * time.Millisecond

// progress shows a long job's progress: on a terminal a bar (or a counter
// when the total is unknown) with rate and time left, redrawn in place;
// otherwise a plain log line every few seconds.
type progress struct {
	w      io.Writer
	label  string
	total  int64
	n      int64
	tty    bool
	start  time.Time
	last   time.Time
	logged time.Time
}

func newProgress(w io.Writer, label string, total int64) *progress {
	tty := false
	if f, ok := w.(*os.File); ok {
		tty = term.IsTerminal(int(f.Fd()))
	}
	now := time.Now()
	return &progress{w: w, label: label, total: total, tty: tty, start: now, last: now, logged: now}
}

func (p *progress) add(n int64) {
	p.n += n
	now := time.Now()
	if p.tty && now.Sub(p.last) >= progressIntervalMin {
		p.last = now
		p.draw(now)
	} else if !p.tty && now.Sub(p.logged) >= 10*progressIntervalMin {
		p.logged = now
		fmt.Fprintf(p.w, "%s: %d done (%.0f/s)\n", p.label, p.n, p.rate(now))
	}
}

func (p *progress) rate(now time.Time) float64 {
	el := now.Sub(p.start).Seconds()
	if el <= 0 {
		return 0
	}
	return float64(p.n) / el
}

func (p *progress) draw(now time.Time) {
	r := p.rate(now)
	if p.total <= 0 {
		fmt.Fprintf(p.w, "\r%s: %d (%.0f/s)   ", p.label, p.n, r)
		return
	}
	const width = 30
	frac := float64(p.n) / float64(p.total)
	if frac > 1 {
		frac = 1
	}
	fill := int(frac * width)
	left := "?"
	if r > 0 {
		left = (time.Duration(float64(p.total-p.n)/r) * time.Second).Round(time.Second).String()
	}
	fmt.Fprintf(p.w, "\r%s [%s%s] %d/%d %.0f/s, %s left   ", p.label, strings.Repeat("=", fill), strings.Repeat(" ", width-fill),
		p.n, p.total, r, left)
}

// done ends the progress display.
func (p *progress) done() {
	if p.tty && p.n > 0 {
		p.draw(time.Now())
		fmt.Fprintln(p.w)
	}
}
