package main

import (
	"bytes"
	"errors"
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/castellan-ca/castellan/storage/storagetest"
)

func TestEscape(t *testing.T) {
	tests := []struct{ in, want string }{
		{"", ""},
		{"spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/b"},
		{"日本語 é ␛ \ufffd", "日本語 é ␛ \ufffd"}, // printable, a literal U+FFFD included
		{"ok\x1b[2J\x1b]0;title\x07", `ok\x1b[2J\x1b]0;title\a`},
		{"line1\nforged line\r\n", `line1\nforged line\r\n`},
		{"a\tb\x00c\x7fd", `a\tb\x00c\x7fd`},
		{"c1 \u0085 \u009b", `c1 \u0085 \u009b`},
		{"spiffe://td/ns/\u202egnp.exe\u202c/sa/x", `spiffe://td/ns/\u202egnp.exe\u202c/sa/x`},
		{"\u2066a\u2069\u200e\u200f\u061c", `\u2066a\u2069\u200e\u200f\u061c`},
		{"a\u2028b\u2029c", `a\u2028b\u2029c`},
		{"zero\u200bwidth\ufeff nb\u00a0sp", `zero\u200bwidth\ufeff nb\u00a0sp`},
		{"bad \xff\xc3 utf-8", `bad \xff\xc3 utf-8`},
		{"surrogate \xed\xa0\x80", `surrogate \xed\xa0\x80`},
		{`back\slash \x1b`, `back\\slash \\x1b`},
		{"private \U000f0000", `private \U000f0000`},
	}
	for _, tc := range tests {
		got := escape(tc.in)
		if got != tc.want {
			t.Errorf("escape(%q) = %q, want %q", tc.in, got, tc.want)
		}
		if escape(tc.in) != got {
			t.Errorf("escape(%q) is not deterministic", tc.in)
		}
		if !safeForTerminal(got) {
			t.Errorf("escape(%q) = %q still holds a character a terminal acts on", tc.in, got)
		}
	}
}

// safeForTerminal reports whether s is valid UTF-8 of printable characters
// (and spaces) only.
func safeForTerminal(s string) bool {
	if !utf8.ValidString(s) {
		return false
	}
	for _, r := range s {
		if !strconv.IsPrint(r) {
			return false
		}
	}
	return true
}

// FuzzEscape: whatever the input, the output is printable and reversible
// (strconv.Unquote of it, in double quotes, gives the input back, a literal
// quote aside, which escape leaves as is).
func FuzzEscape(f *testing.F) {
	for _, s := range storagetest.HostileStrings {
		f.Add(s)
	}
	f.Add(`\x41"`)
	f.Fuzz(func(t *testing.T, s string) {
		got := escape(s)
		if !safeForTerminal(got) {
			t.Fatalf("escape(%q) = %q is not printable", s, got)
		}
		back, err := strconv.Unquote(`"` + strings.ReplaceAll(got, `"`, `\"`) + `"`)
		if err != nil || back != s {
			t.Fatalf("escape(%q) = %q does not unquote to the input: %q, %v", s, got, back, err)
		}
	})
}

type stringer string

func (s stringer) String() string { return string(s) }

func TestTextOutEscapesEveryArgument(t *testing.T) {
	var b bytes.Buffer
	out := textOut{&b}
	out.printf("%s|%v|%s|%s|%d|%q\n", "a\nb", errors.New("e\x1b"), stringer("s\u202e"), []string{"x\ny", "z"}, 7, "q\r")
	out.println("p\x00", 3*time.Second)
	want := `a\nb|e\x1b|s\u202e|[x\ny z]|7|"q\\r"` + "\n" + `p\x00 3s` + "\n"
	if b.String() != want {
		t.Fatalf("got %q, want %q", b.String(), want)
	}
}

func TestLinesOut(t *testing.T) {
	var b bytes.Buffer
	msg := "flag provided but not defined: -x\x1b[2J\n  -data-dir string\n    \tthe \u202edir\n"
	n, err := linesOut{&b}.Write([]byte(msg))
	if err != nil || n != len(msg) {
		t.Fatalf("Write = %d, %v", n, err)
	}
	want := "flag provided but not defined: -x\\x1b[2J\n  -data-dir string\n    \tthe \\u202edir\n"
	if b.String() != want {
		t.Fatalf("got %q, want %q", b.String(), want)
	}
}

// TestHumanOutputGoesThroughTextOut holds the package to its rule: no
// non-test file but escape.go prints with fmt's print functions, so every
// human-readable line goes through textOut (machine formats use encoders).
func TestHumanOutputGoesThroughTextOut(t *testing.T) {
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	checked := 0
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") || name == "escape.go" {
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		checked++
		ast.Inspect(f, func(n ast.Node) bool {
			call, ok := n.(*ast.CallExpr)
			if !ok {
				return true
			}
			switch fn := call.Fun.(type) {
			case *ast.SelectorExpr:
				if pkg, ok := fn.X.(*ast.Ident); ok && pkg.Name == "fmt" && strings.Contains(fn.Sel.Name, "rint") &&
					!strings.HasPrefix(fn.Sel.Name, "S") {
					t.Errorf("%s: fmt.%s prints around textOut: print human-readable output with textOut", fset.Position(call.Pos()), fn.Sel.Name)
				}
			case *ast.Ident:
				if fn.Name == "print" || fn.Name == "println" {
					t.Errorf("%s: builtin %s", fset.Position(call.Pos()), fn.Name)
				}
			}
			return true
		})
	}
	if checked < 5 {
		t.Fatalf("checked %d files: not run in the package directory?", checked)
	}
}
