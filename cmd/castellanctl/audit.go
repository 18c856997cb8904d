package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"iter"
	"strconv"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/internal/adminapi"
	adminpb "github.com/castellan-ca/castellan/proto/castellan/admin/v1"
	"github.com/castellan-ca/castellan/storage"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// parseWhen reads a time flag: RFC 3339, or a date (midnight UTC).
func parseWhen(s string) (time.Time, error) {
	if t, err := time.Parse(time.RFC3339Nano, s); err == nil {
		return t, nil
	}
	t, err := time.Parse(time.DateOnly, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither RFC 3339 (2025-06-01T12:00:00Z) nor a date (2025-06-01)", s)
	}
	return t, nil
}

// bindAuditFilters registers the record filters that audit list and audit
// export share, and returns the function that builds the request once the
// flags are parsed.
func bindAuditFilters(fs *flag.FlagSet) func() (*adminpb.ListAuditRecordsRequest, error) {
	req := &adminpb.ListAuditRecordsRequest{}
	fs.StringVar(&req.Identity, "identity", "", "only records granting or requesting this SPIFFE ID")
	fs.StringVar(&req.Serial, "serial", "", "only records of this serial (lowercase hex)")
	fs.StringVar(&req.CertSha256, "fingerprint", "", "only records of this certificate SHA-256 (hex)")
	fs.StringVar(&req.Outcome, "outcome", "", "issued | refused | failed | ok | undelivered")
	fs.StringVar(&req.Writer, "writer", "", "only this writer's chain")
	fs.StringVar(&req.IssuerKeyId, "issuer", "", "only certificates of this issuing CA key id (hex SubjectKeyId)")
	since := fs.String("since", "", "only records at or after this time (RFC 3339 or YYYY-MM-DD)")
	until := fs.String("until", "", "only records before this time (RFC 3339 or YYYY-MM-DD)")
	return func() (*adminpb.ListAuditRecordsRequest, error) {
		for _, t := range []struct {
			s   string
			dst **timestamppb.Timestamp
		}{{*since, &req.Since}, {*until, &req.Until}} {
			if t.s == "" {
				continue
			}
			v, err := parseWhen(t.s)
			if err != nil {
				return nil, err
			}
			*t.dst = timestamppb.New(v)
		}
		return req, nil
	}
}

// auditPages yields the records matching req in (writer, seq) order, page
// by page: each page continues after the last (writer, seq) seen, across
// every writer's chain. pageSize(seen) is the limit of the next page after
// seen records; a limit of 0 or less, or a short page, ends the sequence.
// An error of ListAuditRecords is yielded last.
func auditPages(ctx context.Context, client adminpb.AdminServiceClient, req *adminpb.ListAuditRecordsRequest,
	pageSize func(seen int) int) iter.Seq2[*adminpb.AuditRecord, error] {
	return func(yield func(*adminpb.AuditRecord, error) bool) {
		for seen := 0; ; {
			size := pageSize(seen)
			if size <= 0 {
				return
			}
			if size > storage.MaxLimit {
				size = storage.MaxLimit // the server's cap: a larger page would come back short and end the listing
			}
			req.Limit = int32(size)
			resp, err := client.ListAuditRecords(ctx, req)
			if err != nil {
				yield(nil, err)
				return
			}
			recs := resp.GetRecords()
			for _, p := range recs {
				if !yield(p, nil) {
					return
				}
			}
			seen += len(recs)
			if len(recs) < size {
				return
			}
			last := recs[len(recs)-1]
			req.AfterWriter, req.AfterSeq = last.GetWriter(), last.GetSeq()
		}
	}
}

// cmdAuditShow prints records in full: one by WRITER/SEQ, or every record of
// a serial or fingerprint (the issuance and any undelivered marker).
func cmdAuditShow(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("audit show", stderr)
	serial := fs.String("serial", "", "every record of this certificate serial (lowercase hex)")
	fingerprint := fs.String("fingerprint", "", "every record of this certificate SHA-256 (hex)")
	output := fs.String("output", "text", "text | json (one object per line)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *output != "text" && *output != "json" {
		return errors.New("audit show: --output must be text or json")
	}
	var (
		writer string
		seq    uint64
	)
	switch {
	case fs.NArg() == 1 && *serial == "" && *fingerprint == "":
		w, s, ok := strings.Cut(fs.Arg(0), "/")
		n, err := strconv.ParseUint(s, 10, 64)
		if !ok || err != nil || w == "" {
			return fmt.Errorf("audit show: %q is not WRITER/SEQ", fs.Arg(0))
		}
		writer, seq = w, n
	case fs.NArg() == 0 && (*serial != "") != (*fingerprint != ""):
	default:
		return errors.New("audit show: give exactly one of WRITER/SEQ, --serial, --fingerprint")
	}
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	var recs []*adminpb.AuditRecord
	if writer != "" {
		resp, err := client.GetAuditRecord(ctx, &adminpb.GetAuditRecordRequest{Writer: writer, Seq: seq})
		if err != nil {
			return fmt.Errorf("audit show: %w", err)
		}
		recs = append(recs, resp.GetRecord())
	} else {
		resp, err := client.ListAuditRecords(ctx, &adminpb.ListAuditRecordsRequest{Serial: *serial, CertSha256: *fingerprint,
			Limit: storage.MaxLimit})
		if err != nil {
			return fmt.Errorf("audit show: %w", err)
		}
		recs = resp.GetRecords()
		if len(recs) == 0 {
			return errors.New("audit show: no record matches")
		}
	}
	enc, text := json.NewEncoder(stdout), textOut{stdout}
	for i, p := range recs {
		r, err := adminapi.RecordFromProto(p)
		if err != nil {
			return fmt.Errorf("audit show: %w", err)
		}
		if *output == "json" {
			if err := enc.Encode(&r); err != nil {
				return err
			}
			continue
		}
		if i > 0 {
			text.println()
		}
		header, row := csvHeader(), csvRow(&r)
		for j, name := range header {
			if row[j] != "" {
				text.printf("%-19s %s\n", name+":", row[j])
			}
		}
	}
	return nil
}

// csvHeader names the CSV columns: the JSON field names of storage.Record.
func csvHeader() []string {
	return []string{"writer", "seq", "time", "kind", "request_id", "peer", "auth_method", "caller", "cluster_id",
		"requested_identity", "granted_identity", "outcome", "reason", "code", "serial", "not_before", "not_after",
		"cert_sha256", "signer", "issuer_key_id", "detail", "prev_hash", "hash"}
}

// csvRow renders r in csvHeader's order; times in RFC 3339 with nanoseconds,
// so an exported row still hashes to its hash.
func csvRow(r *storage.Record) []string {
	tm := func(t time.Time) string {
		if t.IsZero() {
			return ""
		}
		return t.UTC().Format(time.RFC3339Nano)
	}
	return []string{r.Writer, strconv.FormatUint(r.Seq, 10), tm(r.Time), r.Kind, r.RequestID, r.Peer, r.AuthMethod,
		r.Caller, r.ClusterID, r.RequestedIdentity, r.GrantedIdentity, r.Outcome, r.Reason, r.Code, r.Serial,
		tm(r.NotBefore), tm(r.NotAfter), r.CertSHA256, r.Signer, r.IssuerKeyID, r.Detail, r.PrevHash, r.Hash}
}

// cmdAuditPrune removes old records through the server, which signs the
// checkpoint with its checkpoint key.
func cmdAuditPrune(ctx context.Context, g *globals, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("audit prune", stderr)
	beforeFlag := fs.String("before", "", "remove records older than this time (RFC 3339 or YYYY-MM-DD, UTC midnight); required")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *beforeFlag == "" || fs.NArg() > 0 {
		return errors.New("audit prune: --before DATE is required")
	}
	before, err := parseWhen(*beforeFlag)
	if err != nil {
		return fmt.Errorf("audit prune: %w", err)
	}
	client, closeConn, err := g.dial()
	if err != nil {
		return err
	}
	defer closeConn()
	p, err := g.newProgress(stderr, "audit prune (on the server)", "records")
	if err != nil {
		return err
	}
	stop := make(chan struct{})
	go p.whileWaiting(stop)
	resp, err := client.PruneAuditLog(ctx, &adminpb.PruneAuditLogRequest{Before: timestamppb.New(before)})
	close(stop)
	p.Done()
	if err != nil {
		return fmt.Errorf("audit prune: %w", err)
	}
	out := textOut{stdout}
	if resp.GetCheckpointId() == 0 {
		out.printf("nothing older than %s to prune\n", before.UTC().Format(time.RFC3339))
		return nil
	}
	out.printf("pruned %d records older than %s from %d writer(s); checkpoint %d signed by key %.16s…\n",
		resp.GetRemoved(), before.UTC().Format(time.RFC3339), len(resp.GetWriters()), resp.GetCheckpointId(), resp.GetKeyId())
	for _, w := range resp.GetWriters() {
		out.printf("  %s: %d removed, chain resumes at seq %d (prev hash %.16s…)\n", w.GetWriter(), w.GetRemoved(), w.GetSeq()+1, w.GetHash())
	}
	return nil
}
