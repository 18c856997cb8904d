package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"unicode/utf8"
)

// escape returns s as it may reach an operator's terminal: every character
// a terminal could act on, or that would change how the line reads, is
// replaced by a visible Go escape, so that a stored value cannot forge or
// hide output. Escaped are C0 controls (ESC, CR, LF, TAB, ... as \x1b, \r,
// \n, \t), DEL, C1 controls, bidirectional formatting characters (\u202e),
// line and paragraph separators, every other character that is not
// graphic (strconv.IsPrint: format characters, non-ASCII spaces, private
// use, unassigned), each byte of invalid UTF-8 (\xff), and the backslash
// itself (\\), so that an escape in the output always means an escape.
//
// Stores written before audit fields were sanitised (storage.Sanitize) may
// hold any of these; so may certificate subjects and server messages. Every
// human-readable line castellanctl prints passes through escape (textOut);
// machine formats (json, jsonl, csv, PEM) carry the exact data instead.
func escape(s string) string {
	i := 0
	for i < len(s) {
		c := s[i]
		if c >= 0x20 && c < 0x7f && c != '\\' {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			break
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if (r == utf8.RuneError && size == 1) || !strconv.IsPrint(r) {
			break
		}
		i += size
	}
	if i == len(s) {
		return s
	}
	var b strings.Builder
	b.Grow(len(s) + 8)
	b.WriteString(s[:i])
	for i < len(s) {
		r, size := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			fmt.Fprintf(&b, `\x%02x`, s[i])
		case r == '\\':
			b.WriteString(`\\`)
		case strconv.IsPrint(r):
			b.WriteString(s[i : i+size])
		default:
			q := strconv.QuoteRuneToASCII(r) // '\x1b', '\n', '\u202e'
			b.WriteString(q[1 : len(q)-1])
		}
		i += size
	}
	return b.String()
}

// textOut writes castellanctl's human-readable output. Every argument it
// prints is escaped first (strings, errors and Stringers through escape,
// string slices element by element), so no command can print a value raw
// by forgetting to: human-readable output goes through textOut only (a
// test holds the package to that), and the format strings are constants.
type textOut struct{ w io.Writer }

// printf formats like fmt.Fprintf with every argument escaped.
func (o textOut) printf(format string, args ...any) {
	fmt.Fprintf(o.w, format, escapeArgs(args)...)
}

// println prints like fmt.Fprintln with every argument escaped.
func (o textOut) println(args ...any) {
	fmt.Fprintln(o.w, escapeArgs(args)...)
}

// escapeArgs returns args with every text in them escaped; numbers and
// other values are kept, so that verbs like %d still apply.
func escapeArgs(args []any) []any {
	out := make([]any, len(args))
	for i, a := range args {
		switch v := a.(type) {
		case string:
			out[i] = escape(v)
		case error:
			out[i] = escape(v.Error())
		case fmt.Stringer:
			out[i] = escape(v.String())
		case []string:
			e := make([]string, len(v))
			for j, s := range v {
				e[j] = escape(s)
			}
			out[i] = e
		default:
			out[i] = a
		}
	}
	return out
}

// linesOut is the writer given to the flag package for its messages: they
// quote what the operator typed, so each line is escaped, newlines between
// lines and the tabs that indent them kept.
type linesOut struct{ w io.Writer }

// Write escapes p line by line; it reports len(p) written on success.
func (o linesOut) Write(p []byte) (int, error) {
	lines := strings.SplitAfter(string(p), "\n")
	var b strings.Builder
	for _, l := range lines {
		body, nl := strings.CutSuffix(l, "\n")
		for j, part := range strings.Split(body, "\t") { // flag indents with tabs
			if j > 0 {
				b.WriteByte('\t')
			}
			b.WriteString(escape(part))
		}
		if nl {
			b.WriteByte('\n')
		}
	}
	if _, err := io.WriteString(o.w, b.String()); err != nil {
		return 0, err
	}
	return len(p), nil
}
