package main

import (
	"bufio"
	"context"
	"crypto/ed25519"
	"encoding/csv"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/internal/keyfile"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/protobuf/proto"
)

// cmdAuditExport writes the audit log as JSON lines or CSV: the copy an
// auditor or SIEM ingests. Without filters it is the whole log from one
// snapshot (ExportAuditLog) and, as JSON lines, self-contained for offline
// verification: the prune checkpoints, every record, and the head signed
// with the checkpoint key. With filters it is a selection of records
// (paged through ListAuditRecords), which cannot be verified.
func cmdAuditExport(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) (err error) {
	fs := newFlagSet("audit export", stderr)
	filters := bindAuditFilters(fs)
	format := fs.String("format", "jsonl", "jsonl (verifiable without filters) | csv (records only)")
	outPath := fs.String("out", "", "file to write (default: standard output); written whole or not at all")
	if err := fs.Parse(args); err != nil {
		return err
	}
	req, err := filters()
	if err != nil {
		return fmt.Errorf("audit export: %w", err)
	}
	if *format != "jsonl" && *format != "csv" {
		return errors.New("audit export: --format must be jsonl or csv")
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("audit export: unexpected arguments %v", fs.Args())
	}
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()

	out, commit, err := openOutput(*outPath, stdout)
	if err != nil {
		return fmt.Errorf("audit export: %w", err)
	}
	defer func() { err = commit(err) }()
	bw := bufio.NewWriter(out)
	var sink interface {
		storage.ExportSink
		flush() error
	}
	if *format == "csv" {
		sink = &csvSink{w: csv.NewWriter(bw)}
	} else {
		sink = jsonSink{storage.NewExportWriter(bw)}
	}
	filtered := !proto.Equal(req, &adminpb.ListAuditRecordsRequest{})
	p, err := g.newProgress(stderr, "audit export", "records")
	if err != nil {
		return err
	}
	if p != nil && !filtered {
		// The size of the whole log, for the time left (an estimate: the
		// export's snapshot is taken a moment later).
		if total, err := auditSize(ctx, client); err == nil {
			p.SetTotal(total)
		}
	}
	counted := progressSink{sink, p}
	var n exportCounts
	if filtered {
		n, err = exportSelection(ctx, client, req, counted)
	} else {
		n, err = exportAll(ctx, client, counted)
	}
	p.Done()
	if err == nil {
		err = sink.flush()
	}
	if err == nil {
		err = bw.Flush()
	}
	if err != nil {
		return fmt.Errorf("audit export: after %d records: %w", n.records, err)
	}
	text := textOut{stderr}
	switch {
	case filtered:
		text.printf("exported %d records: a selection, without checkpoints or a signed head, which cannot be verified offline\n", n.records)
	case *format == "csv":
		text.printf("exported %d records of %d writer(s) as CSV (records only: export jsonl to verify offline)\n", n.records, n.writers)
	default:
		text.printf("exported %d records of %d writer(s) with %d prune checkpoint(s) and a head signed by checkpoint key %.16s…\n",
			n.records, n.writers, n.checkpoints, n.keyID)
		text.printf("verify it offline: castellanctl audit verify --file EXPORT --checkpoint-key audit-checkpoint-key.pub.pem\n")
	}
	return nil
}

// progressSink counts the records written into a progress.
type progressSink struct {
	storage.ExportSink
	p *progress
}

func (s progressSink) Record(r *storage.Record) error {
	err := s.ExportSink.Record(r)
	s.p.Add(1)
	return err
}

// exportCounts is what an export wrote.
type exportCounts struct {
	records, writers, checkpoints int
	keyID                         string
}

// exportAll streams the whole log into sink and checks the stream's shape:
// checkpoints, records, then exactly one head, last.
func exportAll(ctx context.Context, client adminpb.AdminServiceClient, sink storage.ExportSink) (exportCounts, error) {
	var n exportCounts
	stream, err := client.ExportAuditLog(ctx, &adminpb.ExportAuditLogRequest{})
	if err != nil {
		return n, err
	}
	lastWriter := ""
	for {
		msg, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return n, errors.New("the server's export ended without its signed head")
		}
		if err != nil {
			return n, err
		}
		if n.keyID != "" {
			return n, errors.New("the server sent more after the head")
		}
		for _, p := range msg.GetCheckpoints() {
			cp := adminapi.CheckpointFromProto(p)
			if err := sink.Checkpoint(&cp); err != nil {
				return n, err
			}
			n.checkpoints++
		}
		for _, p := range msg.GetRecords() {
			r, err := adminapi.RecordFromProto(p)
			if err != nil {
				return n, err
			}
			if err := sink.Record(&r); err != nil {
				return n, err
			}
			if n.records == 0 || r.Writer != lastWriter {
				n.writers, lastWriter = n.writers+1, r.Writer
			}
			n.records++
		}
		if p := msg.GetHead(); p != nil {
			h := adminapi.HeadFromProto(p)
			if err := sink.Head(&h); err != nil {
				return n, err
			}
			n.keyID = h.KeyID
			switch _, err := stream.Recv(); {
			case err == nil:
				return n, errors.New("the server sent more after the head")
			case !errors.Is(err, io.EOF):
				return n, fmt.Errorf("after the head: %w", err)
			}
			return n, nil
		}
	}
}

// exportSelection pages the records matching req into sink.
func exportSelection(ctx context.Context, client adminpb.AdminServiceClient, req *adminpb.ListAuditRecordsRequest, sink storage.ExportSink) (exportCounts, error) {
	var n exportCounts
	for p, err := range auditPages(ctx, client, req, func(int) int { return exportPage }) {
		if err != nil {
			return n, err
		}
		r, err := adminapi.RecordFromProto(p)
		if err != nil {
			return n, err
		}
		if err := sink.Record(&r); err != nil {
			return n, err
		}
		n.records++
	}
	return n, nil
}

// exportPage is the page size of a filtered export: a page of records as
// big as stores write them stays far below gRPC's 4 MiB message limit.
const exportPage = 2000

// jsonSink writes JSON lines (storage.ExportWriter).
type jsonSink struct{ *storage.ExportWriter }

func (jsonSink) flush() error { return nil }

// csvSink writes records as CSV rows under a header; checkpoints and the
// head have no place in CSV.
type csvSink struct {
	w      *csv.Writer
	header bool
}

func (c *csvSink) Checkpoint(*storage.Checkpoint) error { return nil }
func (c *csvSink) Head(*storage.Head) error             { return nil }

func (c *csvSink) Record(r *storage.Record) error {
	if !c.header {
		c.header = true
		if err := c.w.Write(csvHeader()); err != nil {
			return err
		}
	}
	return c.w.Write(csvRow(r))
}

func (c *csvSink) flush() error {
	if !c.header {
		if err := c.w.Write(csvHeader()); err != nil {
			return err
		}
	}
	c.w.Flush()
	return c.w.Error()
}

// openOutput returns where to write: stdout, or a temporary file beside path
// that commit renames to path when the command succeeded (and removes
// otherwise), so that a failed export never leaves a plausible partial file.
func openOutput(path string, stdout io.Writer) (io.Writer, func(error) error, error) {
	if path == "" {
		return stdout, func(err error) error { return err }, nil
	}
	f, err := os.CreateTemp(filepath.Dir(path), ".castellanctl-export-*")
	if err != nil {
		return nil, nil, err
	}
	commit := func(err error) error {
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err == nil {
			err = os.Rename(f.Name(), path)
		}
		if err != nil {
			_ = os.Remove(f.Name())
		}
		return err
	}
	return f, commit, nil
}

// cmdAuditVerifyFile verifies an export offline (storage.VerifyExport), with
// the checkpoint public key from a file: no server is asked anything.
func cmdAuditVerifyFile(file, keyFile, previous string, allowUnsigned bool, stdout io.Writer, p *progress) error {
	if keyFile == "" {
		return errors.New("audit verify: --file needs --checkpoint-key PUB (castellanctl audit checkpoint-key, or the server's audit-checkpoint-key.pub.pem)")
	}
	b, err := os.ReadFile(keyFile)
	if err != nil {
		return fmt.Errorf("audit verify: checkpoint key: %w", err)
	}
	k, err := keyfile.ParsePublicKeyPEM(b)
	if err != nil {
		return fmt.Errorf("audit verify: checkpoint key %s: %w", keyFile, err)
	}
	pub, ok := k.(ed25519.PublicKey)
	if !ok {
		return fmt.Errorf("audit verify: checkpoint key %s: %T is not an Ed25519 key", keyFile, k)
	}
	out := textOut{stdout}
	var opts storage.VerifyOptions
	if previous != "" {
		prev, err := verifyFile(previous, pub, storage.VerifyOptions{}, nil)
		if err != nil {
			return err
		}
		if !prev.OK || !prev.Signed {
			out.printf("previous export %s does not verify: %s\n", previous, prev.Problem)
			return exitError{1}
		}
		opts.Previous = prev.Head
	}
	res, err := verifyFile(file, pub, opts, p)
	p.Done()
	if err != nil {
		return err
	}
	switch {
	case !res.OK:
		out.printf("export BROKEN at writer %s seq %d: %s (%d lines read)\n", res.Writer, res.Seq, res.Problem, res.Lines)
		return exitError{1}
	case !res.Signed:
		out.printf("export NOT SIGNED: %d records of %d writer(s) form unbroken chains, but the export has no signed head "+
			"(filtered, CSV-converted or cut short), so nothing shows records cut from the end of a chain, a chain left out, "+
			"or a file rewritten with recomputed hashes\n", res.Records, res.Writers)
		if !allowUnsigned {
			return exitError{1}
		}
		return nil
	}
	out.printf("export intact: %d records of %d writer(s), %d prune checkpoint(s), head of %s signed by checkpoint key %.16s…\n",
		res.Records, res.Writers, res.Checkpoints, res.Head.Time.Format(time.RFC3339), res.Head.KeyID)
	if opts.Previous != nil {
		out.printf("and it holds every record the head of %s named (the log only grew, or was pruned under a checkpoint)\n", previous)
	}
	return nil
}

// verifyFile runs storage.VerifyExport on a file, counting its bytes into p.
func verifyFile(path string, pub ed25519.PublicKey, opts storage.VerifyOptions, p *progress) (storage.ExportResult, error) {
	f, err := os.Open(path)
	if err != nil {
		return storage.ExportResult{}, fmt.Errorf("audit verify: %w", err)
	}
	defer f.Close()
	var r io.Reader = f
	if p != nil {
		if st, err := f.Stat(); err == nil {
			p.SetTotal(st.Size())
		}
		r = countingReader{f, p}
	}
	res, err := storage.VerifyExport(r, pub, opts)
	if err != nil {
		return res, fmt.Errorf("audit verify: %s: %w", path, err)
	}
	return res, nil
}

// cmdAuditCheckpointKey prints the server's checkpoint public key (PEM),
// what an auditor verifies exports with; its key id goes to stderr.
func cmdAuditCheckpointKey(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("audit checkpoint-key", stderr)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("audit checkpoint-key: unexpected arguments %v", fs.Args())
	}
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	resp, err := client.GetAuditCheckpointKey(ctx, &adminpb.GetAuditCheckpointKeyRequest{})
	if err != nil {
		return fmt.Errorf("audit checkpoint-key: %w", err)
	}
	k, err := keyfile.ParsePublicKeyPEM([]byte(resp.GetPublicKeyPem()))
	if err != nil {
		return fmt.Errorf("audit checkpoint-key: the server sent a key that does not parse: %w", err)
	}
	if pub, ok := k.(ed25519.PublicKey); !ok || storage.CheckpointKeyID(pub) != resp.GetKeyId() {
		return fmt.Errorf("audit checkpoint-key: the server sent a key that is not the Ed25519 key %.16s…", resp.GetKeyId())
	}
	if _, err := io.WriteString(stdout, resp.GetPublicKeyPem()); err != nil {
		return err
	}
	textOut{stderr}.printf("checkpoint key id %s\n", resp.GetKeyId())
	return nil
}
