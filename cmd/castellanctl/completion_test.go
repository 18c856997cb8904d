package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCommandTreeMatchesDispatch: every command the completion offers is
// one run dispatches (its -h is a flag set's help, not "unknown command").
func TestCommandTreeMatchesDispatch(t *testing.T) {
	for parent, subs := range commandTree {
		if parent == "completion" {
			continue
		}
		for _, s := range subs {
			path := strings.Fields(parent + " " + s)
			if _, inner := commandTree[strings.Join(path, " ")]; inner {
				continue
			}
			err := run(context.Background(), append(path, "-h"), io.Discard, io.Discard)
			if !errors.Is(err, flag.ErrHelp) {
				t.Errorf("%v -h: %v, want flag.ErrHelp", path, err)
			}
		}
	}
}

// writeScript writes castellanctl completion SHELL into a temporary file.
func writeScript(t *testing.T, shell string) string {
	t.Helper()
	var out bytes.Buffer
	if err := run(context.Background(), []string{"completion", shell}, &out, io.Discard); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "castellanctl."+shell)
	if err := os.WriteFile(p, out.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestCompletionScriptsParse(t *testing.T) {
	for _, shell := range []string{"bash", "zsh"} {
		t.Run(shell, func(t *testing.T) {
			bin, err := exec.LookPath(shell)
			if err != nil {
				t.Skipf("%s not installed", shell)
			}
			if out, err := exec.Command(bin, "-n", writeScript(t, shell)).CombinedOutput(); err != nil {
				t.Errorf("%s -n: %v\n%s", shell, err, out)
			}
		})
	}
	if err := cmdCompletion(context.Background(), []string{"fish"}, io.Discard); err == nil {
		t.Error("completion fish: no error")
	}
}

// TestBashCompletion sources the bash script and asks it, as bash's
// programmable completion would, for the words after partial command lines.
func TestBashCompletion(t *testing.T) {
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not installed")
	}
	script := writeScript(t, "bash")
	tests := []struct {
		line []string // the words typed, the last one partial
		want string   // COMPREPLY, space-joined
	}{
		{[]string{"castellanctl", "au"}, "audit"},
		{[]string{"castellanctl", "c"}, "ca completion"},
		{[]string{"castellanctl", "audit", "ve"}, "verify"},
		{[]string{"castellanctl", "--data-dir", "/tmp/x", "audit", "ex"}, "export"},
		{[]string{"castellanctl", "ca", "rotate", "a"}, "activate"},
		{[]string{"castellanctl", "doctor", "--ku"}, "--kubeconfig"},
		{[]string{"castellanctl", "audit", "verify", "--f"}, "--file"},
		{[]string{"castellanctl", "--ser"}, "--server --server-name"},
		{[]string{"castellanctl", "doctor", "--kubeconfig", ""}, ""}, // a value: the shell's own file completion
		{[]string{"castellanctl", "completion", "z"}, "zsh"},
	}
	for _, tc := range tests {
		t.Run(strings.Join(tc.line, " "), func(t *testing.T) {
			var words strings.Builder
			for _, w := range tc.line {
				words.WriteString(" '" + w + "'")
			}
			prog := "source '" + script + "'\nCOMP_WORDS=(" + words.String() + ")\nCOMP_CWORD=" +
				string(rune('0'+len(tc.line)-1)) + "\n_castellanctl\necho \"${COMPREPLY[*]}\"\n"
			out, err := exec.Command(bash, "--norc", "--noprofile", "-c", prog).CombinedOutput()
			if err != nil {
				t.Fatalf("bash: %v\n%s", err, out)
			}
			if got := strings.TrimSpace(string(out)); got != tc.want {
				t.Errorf("COMPREPLY = %q, want %q", got, tc.want)
			}
		})
	}
}
