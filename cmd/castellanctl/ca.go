package main

import (
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

// cmdCA dispatches `castellanctl ca status|rotate ...`.
func cmdCA(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return fmt.Errorf("ca: want status or rotate")
	}
	switch args[0] {
	case "status":
		return cmdCAStatus(ctx, g, args[1:], stdout, stderr)
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
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	resp, err := client.RotateCA(ctx, &adminpb.RotateCARequest{Step: step, Target: *target, Force: *force})
	if err != nil {
		return fmt.Errorf("ca rotate %s: %w", step, err)
	}
	st := adminapi.RotationStatusFromProto(resp.GetStatus())
	if *output == "table" {
		fmt.Fprintln(stdout, st.Summary)
	}
	return printCAStatus(stdout, st, *output)
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
}

func printCAStatus(w io.Writer, st *adminapi.RotationStatus, output string) error {
	if output == "json" {
		out := struct {
			Backend           string   `json:"backend"`
			Version           uint64   `json:"version"`
			PropagationWindow string   `json:"propagation_window"`
			Schedule          bool     `json:"schedule"`
			Summary           string   `json:"summary,omitempty"`
			CAs               []caJSON `json:"cas"`
		}{st.Backend, st.Version, st.PropagationWindow.String(), st.Schedule, st.Summary, nil}
		for _, c := range st.CAs {
			out.CAs = append(out.CAs, caJSON{c.KeyID, c.RootKeyID, c.Role, c.Source, c.Phase, c.Issuing, c.Subject, c.NotBefore,
				c.NotAfter, c.PreparedAt, c.ActivatedAt, c.DeactivatedAt, c.RetiredAt, c.DependentsUntil, c.NextStepAt})
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
