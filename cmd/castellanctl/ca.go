package main

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/castellan-ca/castellan/internal/adminapi"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
)

// cmdCA dispatches `castellanctl ca status|rotate|rekey ...`.
func cmdCA(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("ca: want status, rotate or rekey")
	}
	switch args[0] {
	case "status":
		return cmdCAStatus(ctx, g, args[1:], stdout, stderr)
	case "rekey":
		return cmdCARekey(ctx, g, args[1:], stdout, stderr)
	case "rotate":
		if len(args) < 2 {
			return fmt.Errorf("ca rotate: want prepare, activate or retire")
		}
		return cmdCARotate(ctx, g, args[1], args[2:], stdout, stderr)
	}
	return fmt.Errorf("ca: unknown subcommand %q", args[0])
}

func cmdCAStatus(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("ca status", stderr)
	output := fs.String("output", "table", "table | json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *output != "table" && *output != "json" {
		return fmt.Errorf("ca status: --output must be table or json")
	}
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	resp, err := client.GetCAStatus(ctx, &adminpb.GetCAStatusRequest{})
	if err != nil {
		return fmt.Errorf("ca status: %w", err)
	}
	return printCAStatus(stdout, adminapi.RotationStatusFromProto(resp.GetStatus()), *output)
}

func cmdCARotate(ctx context.Context, g *globals, step string, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("ca rotate "+step, stderr)
	target := fs.String("target", adminapi.TargetRoot, "root | intermediate")
	force := fs.Bool("force", false, "skip the safety check (propagation window, certificates still chaining to the CA); audited")
	output := fs.String("output", "table", "table | json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case step != adminapi.StepPrepare && step != adminapi.StepActivate && step != adminapi.StepRetire:
		return fmt.Errorf("ca rotate: unknown step %q: want prepare, activate or retire", step)
	case *target != adminapi.TargetRoot && *target != adminapi.TargetIntermediate:
		return fmt.Errorf("ca rotate: --target must be root or intermediate")
	case *output != "table" && *output != "json":
		return fmt.Errorf("ca rotate: --output must be table or json")
	case fs.NArg() > 0:
		return fmt.Errorf("ca rotate: unexpected arguments %v", fs.Args())
	}
	return caStep(ctx, g, "ca rotate "+step, *output, stdout, func(c adminpb.AdminServiceClient) (*adminpb.CAStatus, error) {
		resp, err := c.RotateCA(ctx, &adminpb.RotateCARequest{Step: step, Target: *target, Force: *force})
		return resp.GetStatus(), err
	})
}

// caStep runs one state-changing CA call and prints what it did (table
// output) and the state after it.
func caStep(ctx context.Context, g *globals, what, output string, stdout io.Writer,
	call func(adminpb.AdminServiceClient) (*adminpb.CAStatus, error)) error {
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	status, err := call(client)
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	st := adminapi.RotationStatusFromProto(status)
	if output == "table" {
		fmt.Fprintln(stdout, st.Summary)
	}
	return printCAStatus(stdout, st, output)
}

// cmdCARekey runs one step of a key-encryption key rotation. The KEK file
// is a path on the server: the key never leaves it.
func cmdCARekey(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("ca rekey", stderr)
	file := fs.String("new-kek-file", "", "the new key-encryption key: a file ON THE SERVER, one of its caKEKFile or caKEKFiles")
	finish := fs.Bool("finish", false, "drop the sealings under the old KEK (once every replica holds the new one)")
	output := fs.String("output", "table", "table | json")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case (*file == "") == !*finish:
		return fmt.Errorf("ca rekey: give either --new-kek-file FILE or --finish")
	case *output != "table" && *output != "json":
		return fmt.Errorf("ca rekey: --output must be table or json")
	case fs.NArg() > 0:
		return fmt.Errorf("ca rekey: unexpected arguments %v", fs.Args())
	}
	return caStep(ctx, g, "ca rekey", *output, stdout, func(c adminpb.AdminServiceClient) (*adminpb.CAStatus, error) {
		resp, err := c.RekeyCA(ctx, &adminpb.RekeyCARequest{NewKekFile: *file, Finish: *finish})
		return resp.GetStatus(), err
	})
}

// caJSON is the JSON form of one CA in `ca status --output json`.
type caJSON struct {
	KeyID           string    `json:"key_id"`
	RootKeyID       string    `json:"root_key_id"`
	Role            string    `json:"role"`
	Source          string    `json:"source"`
	Phase           string    `json:"phase"`
	Issuing         bool      `json:"issuing"`
	Subject         string    `json:"subject"`
	NotBefore       time.Time `json:"not_before"`
	NotAfter        time.Time `json:"not_after"`
	PreparedAt      time.Time `json:"prepared_at,omitzero"`
	ActivatedAt     time.Time `json:"activated_at,omitzero"`
	DeactivatedAt   time.Time `json:"deactivated_at,omitzero"`
	RetiredAt       time.Time `json:"retired_at,omitzero"`
	DependentsUntil time.Time `json:"dependents_until,omitzero"`
	NextStepAt      time.Time `json:"next_step_at,omitzero"`
	KeyURI          string    `json:"key_uri,omitempty"`
}

func printCAStatus(w io.Writer, st *adminapi.RotationStatus, output string) error {
	if output == "json" {
		out := struct {
			Backend           string   `json:"backend"`
			Version           uint64   `json:"version"`
			PropagationWindow string   `json:"propagation_window"`
			Schedule          bool     `json:"schedule"`
			Summary           string   `json:"summary,omitempty"`
			SealedUnder       []string `json:"sealed_under_kek_ids"`
			CAs               []caJSON `json:"cas"`
		}{st.Backend, st.Version, st.PropagationWindow.String(), st.Schedule, st.Summary, st.SealedUnder, nil}
		for _, c := range st.CAs {
			out.CAs = append(out.CAs, caJSON{c.KeyID, c.RootKeyID, c.Role, c.Source, c.Phase, c.Issuing, c.Subject, c.NotBefore,
				c.NotAfter, c.PreparedAt, c.ActivatedAt, c.DeactivatedAt, c.RetiredAt, c.DependentsUntil, c.NextStepAt, c.KeyURI})
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	schedule := "off"
	if st.Schedule {
		schedule = "on"
	}
	fmt.Fprintf(w, "backend %s, state version %d, propagation window %s, schedule %s\n", st.Backend, st.Version, st.PropagationWindow, schedule)
	if len(st.SealedUnder) > 0 {
		keks := make([]string, len(st.SealedUnder))
		for i, id := range st.SealedUnder {
			keks[i] = cmp.Or(id, "none (unencrypted)")
		}
		note := ""
		if len(keks) > 1 {
			note = " (rekey under way: the first is the new KEK)"
		}
		fmt.Fprintf(w, "CA keys sealed under KEK %s%s\n", strings.Join(keks, ", "), note)
	}
	var held []string
	for _, c := range st.CAs {
		if c.KeyURI != "" {
			held = append(held, c.KeyID+" at "+c.KeyURI)
		}
	}
	if len(held) > 0 {
		fmt.Fprintf(w, "CA keys held by a key provider (sealed under no KEK): %s\n", strings.Join(held, ", "))
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ROLE\tKEY ID\tPHASE\tNOT BEFORE\tNOT AFTER\tDEPENDENTS UNTIL\tNEXT STEP\tSUBJECT")
	for _, c := range st.CAs {
		phase := c.Phase
		if c.Issuing {
			phase += " (issuing)"
		}
		role := c.Role
		if c.Source != "managed" {
			role += " (" + c.Source + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", role, c.KeyID, phase, stamp(c.NotBefore), stamp(c.NotAfter),
			stamp(c.DependentsUntil), nextStep(c), c.Subject)
	}
	return tw.Flush()
}

// nextStep describes what happens next to c and from when.
func nextStep(c adminapi.CAStatus) string {
	if c.NextStepAt.IsZero() {
		return "-"
	}
	verb := map[string]string{"prepared": "activate", "previous": "retire", "active": "scheduled prepare"}[c.Phase]
	return strings.TrimSpace(verb + " from " + stamp(c.NextStepAt))
}

func stamp(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format(time.RFC3339)
}
