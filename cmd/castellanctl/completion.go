package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
)

// commandTree lists castellanctl's commands and subcommands, for shell
// completion (the dispatch in run must accept every path; a test holds the
// two together).
var commandTree = map[string][]string{
	"":           {"bundle", "issue", "audit", "ca", "doctor", "completion"},
	"audit":      {"list", "show", "verify", "export", "checkpoint-key", "prune"},
	"ca":         {"status", "rotate", "rekey"},
	"ca rotate":  {"prepare", "activate", "retire"},
	"completion": {"bash", "zsh"},
}

// completionFlag is one flag of a command, as its usage prints it.
type completionFlag struct {
	name      string
	takesArgs bool
}

// usageFlag matches a flag line of flag.PrintDefaults: "  -name" for a
// boolean, "  -name type" otherwise.
var usageFlag = regexp.MustCompile(`(?m)^  -([A-Za-z0-9][A-Za-z0-9-]*)( \S+)?$`)

// commandFlags returns the flags of the command at path ("" for the global
// ones) from its own usage (run with -h), so completion never lists a flag
// the command does not have.
func commandFlags(ctx context.Context, path string) ([]completionFlag, error) {
	args := []string{"-h"}
	if path != "" {
		args = append(strings.Fields(path), "-h")
	}
	var usage bytes.Buffer
	err := run(ctx, args, io.Discard, &usage)
	if !errors.Is(err, flag.ErrHelp) {
		return nil, fmt.Errorf("completion: %q -h: %w", path, err)
	}
	text := usage.String()
	if path != "" {
		text = text[strings.Index(text, "\n")+1:] // past the usage line of the command's flag set
	}
	var out []completionFlag
	for _, m := range usageFlag.FindAllStringSubmatch(text, -1) {
		out = append(out, completionFlag{name: m[1], takesArgs: m[2] != ""})
	}
	return out, nil
}

// cmdCompletion prints a completion script for bash or zsh.
func cmdCompletion(ctx context.Context, args []string, stdout io.Writer) error {
	if len(args) != 1 || (args[0] != "bash" && args[0] != "zsh") {
		return errors.New("completion: want bash or zsh")
	}
	script, err := completionScript(ctx, args[0])
	if err != nil {
		return err
	}
	_, err = io.WriteString(stdout, script)
	return err
}

// completionScript generates the script: one bash function (zsh runs it
// through bashcompinit) that walks the words typed so far, skipping flags
// and their values, and offers the subcommands or flags of where it ends.
func completionScript(ctx context.Context, shell string) (string, error) {
	paths := []string{""}
	for p, subs := range commandTree {
		for _, s := range subs {
			if p == "completion" {
				continue // completion's arguments are not commands with flags
			}
			child := strings.TrimSpace(p + " " + s)
			if _, inner := commandTree[child]; !inner {
				paths = append(paths, child)
			}
		}
	}
	slices.Sort(paths)
	valued := map[string]bool{}
	var cases strings.Builder
	for _, p := range paths {
		flags, err := commandFlags(ctx, p)
		if err != nil {
			return "", err
		}
		names := make([]string, len(flags))
		for i, f := range flags {
			names[i] = "--" + f.name
			if f.takesArgs {
				valued["-"+f.name] = true
				valued["--"+f.name] = true
			}
		}
		cases.WriteString(fmt.Sprintf("        %q) flags=%q ;;\n", p, strings.Join(names, " ")))
	}
	var subs strings.Builder
	keys := make([]string, 0, len(commandTree))
	for k := range commandTree {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		subs.WriteString(fmt.Sprintf("        %q) words=%q ;;\n", k, strings.Join(commandTree[k], " ")))
	}
	valuedList := make([]string, 0, len(valued))
	for k := range valued {
		valuedList = append(valuedList, k)
	}
	slices.Sort(valuedList)

	var b strings.Builder
	if shell == "zsh" {
		b.WriteString("#compdef castellanctl\n# zsh completion for castellanctl: source <(castellanctl completion zsh) after compinit.\n" +
			"autoload -U +X bashcompinit && bashcompinit\n")
	} else {
		b.WriteString("# bash completion for castellanctl: source <(castellanctl completion bash)\n")
	}
	b.WriteString(fmt.Sprintf(`_castellanctl() {
    local cur="${COMP_WORDS[COMP_CWORD]}" path="" w i words="" flags=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        case "$w" in
            -*=*) ;;
            -*) case " %s " in *" $w "*) ((i++)) ;; esac ;;
            *) path="${path:+$path }$w" ;;
        esac
    done
    case "$path" in
%s    esac
    case "$path" in
%s    esac
    case " %s " in *" ${COMP_WORDS[COMP_CWORD-1]} "*) COMPREPLY=(); return ;; esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
    else
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
    fi
}
complete -o default -F _castellanctl castellanctl
`, strings.Join(valuedList, " "), subs.String(), cases.String(), strings.Join(valuedList, " ")))
	return b.String(), nil
}
