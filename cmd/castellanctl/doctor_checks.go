package main

import (
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/castellan-ca/castellan/internal/adminapi"
	"github.com/castellan-ca/castellan/internal/kubebundle"
	"github.com/castellan-ca/castellan/signer"
	"github.com/castellan-ca/castellan/storage"
)

// The outcomes of a doctor check. Only statusFail makes doctor exit non-zero:
// a warning is worth reading but nothing is broken yet, and a skipped check
// had nothing to look at (no kubeconfig) or could not run (its inputs failed
// another check, which already failed).
const (
	statusOK   = "ok"
	statusFail = "FAIL"
	statusWarn = "warn"
	statusSkip = "skip"
)

// The names of doctor's checks, in the order they run and print.
const (
	checkServer  = "server"
	checkBundle  = "trust-bundle"
	checkAudit   = "audit-chain"
	checkCA      = "ca-expiry"
	checkSkew    = "clock-skew"
	checkRBAC    = "kube-rbac"
	maxListed    = 5 // names listed in one finding; the rest are counted
	daysLayout   = "2006-01-02"
	skewFailOver = 2 * time.Minute // the server's default backdating of NotBefore (clockSkew)
)

// checkResult is one line of doctor's report.
type checkResult struct {
	Status, Name, Finding, Hint string
}

func (r checkResult) failed() bool { return r.Status == statusFail }

// evalServingCert judges the serving chain the server presented: it must
// chain to roots, be valid now and carry every name in names. It warns when
// less than a quarter of the leaf's lifetime is left: the server renews its
// own at two thirds, so a quarter left means renewal is not happening.
func evalServingCert(chain, roots []*x509.Certificate, names []string, now time.Time) checkResult {
	r := checkResult{Name: checkServer}
	if len(chain) == 0 {
		r.Status, r.Finding = statusFail, "the server presented no certificate"
		r.Hint = "check the server's logs for its serving certificate"
		return r
	}
	leaf := chain[0]
	switch {
	case now.After(leaf.NotAfter):
		r.Status = statusFail
		r.Finding = fmt.Sprintf("serving certificate expired %s (%s ago)", leaf.NotAfter.UTC().Format(time.RFC3339), roundDur(now.Sub(leaf.NotAfter)))
		r.Hint = "the server renews it at two thirds of servingCertTTL from its CA: check that the issuing CA itself is valid (ca-expiry) and the server's logs for renewal errors, then restart the server"
		return r
	case now.Before(leaf.NotBefore):
		r.Status = statusFail
		r.Finding = fmt.Sprintf("serving certificate not valid before %s", leaf.NotBefore.UTC().Format(time.RFC3339))
		r.Hint = "this machine's clock is behind the server's (see clock-skew): fix NTP on the slower one"
		return r
	}
	pool := x509.NewCertPool()
	for _, c := range roots {
		pool.AddCert(c)
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		r.Status = statusFail
		r.Finding = fmt.Sprintf("serving certificate (issuer %s) does not chain to the trust bundle file: %v", leaf.Issuer, err)
		r.Hint = "the trust bundle file (--ca, default DATA_DIR/root-cert.pem) holds other roots than the server's: replace it with the server's bundle (root-cert.pem of the istio-ca-root-cert ConfigMap, or the server's own DATA_DIR/root-cert.pem)"
		return r
	}
	var missing []string
	for _, n := range names {
		if leaf.VerifyHostname(n) != nil {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		r.Status = statusFail
		r.Finding = fmt.Sprintf("serving certificate lacks %s (it has %s)", strings.Join(missing, ", "), strings.Join(leafNames(leaf), ", "))
		r.Hint = "add the names to the server's servingDNSNames (--serving-dns-names), or dial a name it has (--server-name)"
		return r
	}
	left, life := leaf.NotAfter.Sub(now), leaf.NotAfter.Sub(leaf.NotBefore)
	r.Status = statusOK
	r.Finding = fmt.Sprintf("serving certificate valid for %s, chains to the trust bundle, expires in %s", strings.Join(names, ", "), roundDur(left))
	if left < life/4 {
		r.Status = statusWarn
		r.Hint = "the server renews its serving certificate at two thirds of its lifetime: check its logs for renewal errors"
	}
	return r
}

// leafNames lists the DNS and IP SANs of c.
func leafNames(c *x509.Certificate) []string {
	out := slices.Clone(c.DNSNames)
	for _, ip := range c.IPAddresses {
		out = append(out, ip.String())
	}
	if len(out) == 0 {
		return []string{"no DNS or IP names"}
	}
	return out
}

// bundleSource is one place the trust bundle is published, as doctor read it.
type bundleSource struct {
	Name string // "server", "root-cert.pem (PATH)", "ConfigMap ns/istio-ca-root-cert", ...
	Kind string // sourceServer, sourceFile, sourceConfigMap, sourceCTB
	PEM  string
	Err  error // could not be read: missing, unparsable
}

// The kinds of bundleSource, each with its own fix.
const (
	sourceServer    = "server"
	sourceFile      = "file"
	sourceConfigMap = "configmap"
	sourceCTB       = "clustertrustbundle"
)

// bundleHints says how each kind of stale copy is put right.
var bundleHints = map[string]string{
	sourceFile: "the server rewrites DATA_DIR/root-cert.pem on every bundle change: check it can write there; a copy given with --ca " +
		"must be refreshed by hand (from the istio-ca-root-cert ConfigMap)",
	sourceConfigMap: "the elected replica rewrites the istio-ca-root-cert ConfigMaps within seconds: check rootConfigMaps is on, " +
		"that the Lease castellan-root-configmaps has a live holder and the server's RBAC (kube-rbac), and that no other writer (istiod's CA) competes",
	sourceCTB: "the elected replica rewrites its ClusterTrustBundles: check the Lease castellan-kube-signers has a live holder and " +
		"the server's RBAC (attest on the signer, update on the bundle)",
}

// evalBundles compares every source with the server's bundle (sources of
// kind sourceServer), or, when the server could not be asked, with the set of
// roots most sources hold, and names the sources that differ.
func evalBundles(sources []bundleSource) checkResult {
	r := checkResult{Name: checkBundle}
	var readable []bundleSource
	var unreadable []string
	for _, s := range sources {
		if s.Err != nil {
			unreadable = append(unreadable, fmt.Sprintf("%s (%v)", s.Name, s.Err))
			continue
		}
		readable = append(readable, s)
	}
	ref, refName := referenceBundle(readable)
	if ref == nil {
		r.Status, r.Finding = statusFail, "no trust bundle could be read: "+listNames(unreadable)
		r.Hint = "see the server check: doctor needs the server or a readable root-cert.pem"
		return r
	}
	var stale []string
	hints := map[string]bool{}
	counts := map[string]int{}
	for _, s := range readable {
		counts[s.Kind]++
		if !kubebundle.SameRoots(s.PEM, ref.pem, ref.roots) {
			stale = append(stale, s.Name)
			hints[s.Kind] = true
		}
	}
	for _, s := range sources {
		if s.Err != nil {
			hints[s.Kind] = true
		}
	}
	if len(stale) == 0 && len(unreadable) == 0 {
		r.Status = statusOK
		r.Finding = fmt.Sprintf("%d root(s) %s; the same in %s", len(ref.roots), fingerprints(ref.roots), describeCounts(counts))
		return r
	}
	r.Status = statusFail
	var parts []string
	if len(stale) > 0 {
		parts = append(parts, fmt.Sprintf("stale (differ from the %s): %s", refName, listNames(stale)))
	}
	if len(unreadable) > 0 {
		parts = append(parts, "unreadable: "+listNames(unreadable))
	}
	r.Finding = strings.Join(parts, "; ")
	var hs []string
	for _, k := range []string{sourceFile, sourceConfigMap, sourceCTB} {
		if hints[k] {
			hs = append(hs, bundleHints[k])
		}
	}
	r.Hint = strings.Join(hs, "; ")
	return r
}

// parsedBundle is a reference bundle: its PEM and roots.
type parsedBundle struct {
	pem   string
	roots []*x509.Certificate
}

// referenceBundle is what the other sources are compared with: the
// server's bundle when it was read, else the set of roots most sources hold.
func referenceBundle(sources []bundleSource) (*parsedBundle, string) {
	parse := func(s bundleSource) *parsedBundle {
		roots, err := signer.ParseCertificatesPEM([]byte(s.PEM))
		if err != nil || len(roots) == 0 {
			return nil
		}
		return &parsedBundle{pem: s.PEM, roots: roots}
	}
	for _, s := range sources {
		if s.Kind == sourceServer {
			if b := parse(s); b != nil {
				return b, "server's bundle"
			}
		}
	}
	var best *parsedBundle
	bestVotes := 0
	for _, s := range sources {
		b := parse(s)
		if b == nil {
			continue
		}
		votes := 0
		for _, o := range sources {
			if kubebundle.SameRoots(o.PEM, b.pem, b.roots) {
				votes++
			}
		}
		if votes > bestVotes {
			best, bestVotes = b, votes
		}
	}
	return best, "roots most copies hold (the server could not be asked)"
}

// describeCounts renders how many sources of each kind agreed.
func describeCounts(counts map[string]int) string {
	var parts []string
	for _, k := range []struct{ kind, one, many string }{
		{sourceServer, "the server", "the server"}, {sourceFile, "the trust bundle file", "the trust bundle files"},
		{sourceConfigMap, "1 root ConfigMap", "%d root ConfigMaps"}, {sourceCTB, "1 ClusterTrustBundle", "%d ClusterTrustBundles"},
	} {
		switch n := counts[k.kind]; {
		case n == 1:
			parts = append(parts, k.one)
		case n > 1:
			parts = append(parts, strings.ReplaceAll(k.many, "%d", fmt.Sprint(n)))
		}
	}
	return strings.Join(parts, ", ")
}

// fingerprints lists the first bytes of each root's SHA-256 key id.
func fingerprints(roots []*x509.Certificate) string {
	ids := make([]string, len(roots))
	for i, c := range roots {
		ids[i] = fmt.Sprintf("%.8s", hex.EncodeToString(c.SubjectKeyId))
	}
	return "[" + strings.Join(ids, " ") + "]"
}

// listNames joins names, at most maxListed of them.
func listNames(names []string) string {
	if len(names) <= maxListed {
		return strings.Join(names, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(names[:maxListed], ", "), len(names)-maxListed)
}

// evalAudit judges an audit chain verification; mode says what was verified.
func evalAudit(res storage.VerifyResult, mode string) checkResult {
	r := checkResult{Name: checkAudit}
	if !res.OK {
		r.Status = statusFail
		r.Finding = fmt.Sprintf("%s: BROKEN at writer %s seq %d: %s", mode, res.Writer, res.Seq, res.Problem)
		r.Hint = "the audit store was edited outside Castellan or lost rows: keep it as evidence, run `castellanctl audit verify` " +
			"and restore the store from backup; records before the break are trustworthy"
		return r
	}
	r.Status = statusOK
	r.Finding = fmt.Sprintf("%s: %d records of %d writer(s) intact", mode, res.Records, res.Writers)
	return r
}

// evalCA judges the rotation status: the CAs in use must be valid, and one
// expiring within warn must have a prepared successor (or the schedule on).
func evalCA(st *adminapi.RotationStatus, now time.Time, warn time.Duration) checkResult {
	r := checkResult{Name: checkCA}
	prepared := map[string]*adminapi.CAStatus{}
	for i, c := range st.CAs {
		if c.Phase == storage.PhasePrepared {
			prepared[c.Role] = &st.CAs[i]
		}
	}
	var soonest *adminapi.CAStatus
	var notes []string
	for i, c := range st.CAs {
		if c.Phase != storage.PhaseActive {
			continue
		}
		if now.After(c.NotAfter) {
			r.Status = statusFail
			r.Finding = fmt.Sprintf("active %s CA %.16s expired %s", c.Role, c.KeyID, c.NotAfter.UTC().Format(time.RFC3339))
			r.Hint = caHint(c)
			return r
		}
		if soonest == nil || c.NotAfter.Before(soonest.NotAfter) {
			soonest = &st.CAs[i]
		}
	}
	if soonest == nil {
		r.Status, r.Finding = statusFail, "no active CA"
		r.Hint = "activate a prepared CA: castellanctl ca rotate activate"
		return r
	}
	for _, c := range st.CAs {
		if !c.NextStepAt.IsZero() {
			notes = append(notes, fmt.Sprintf("%s %.16s: %s", c.Role, c.KeyID, nextStep(c)))
		}
	}
	schedule := "schedule off"
	if st.Schedule {
		schedule = "schedule on"
	}
	left := soonest.NotAfter.Sub(now)
	r.Finding = fmt.Sprintf("%s CA %.16s expires %s (in %s); %s", soonest.Role, soonest.KeyID,
		soonest.NotAfter.UTC().Format(daysLayout), roundDur(left), schedule)
	if succ := prepared[soonest.Role]; succ != nil {
		r.Finding += fmt.Sprintf("; successor %.16s prepared", succ.KeyID)
	}
	if len(notes) > 0 {
		r.Finding += "; next: " + strings.Join(notes, ", ")
	}
	r.Status = statusOK
	// The schedule prepares a managed CA's successor at its NextStepAt; one
	// past due without a successor is a schedule that is not running.
	scheduled := st.Schedule && soonest.Source == storage.SourceManaged && soonest.NextStepAt.After(now)
	if left < warn && prepared[soonest.Role] == nil && !scheduled {
		r.Status = statusFail
		r.Finding = "expiring without a prepared successor: " + r.Finding
		r.Hint = caHint(*soonest)
	}
	return r
}

// caHint says how to replace CA c.
func caHint(c adminapi.CAStatus) string {
	if c.Source == storage.SourceExternal {
		return "the CA comes from the cacerts files: install a renewed CA there (the server reloads them), " +
			"then run the rotation (castellanctl ca rotate prepare, activate, retire)"
	}
	return fmt.Sprintf("start its rotation now: castellanctl ca rotate prepare --target %s (then activate after the propagation window), "+
		"or turn the rotation schedule on", c.Role)
}

// evalSkew judges the difference between the server's clock (serverTime,
// read during a call sent at sent and answered at received by this
// machine's clock). The call's duration bounds the error of the estimate.
func evalSkew(sent, received, serverTime time.Time, limit time.Duration) checkResult {
	r := checkResult{Name: checkSkew}
	if serverTime.IsZero() {
		r.Status, r.Finding = statusSkip, "the server does not report its time (older than this castellanctl)"
		return r
	}
	rtt := received.Sub(sent)
	skew := serverTime.Sub(sent.Add(rtt / 2))
	abs := skew
	if abs < 0 {
		abs = -abs
	}
	dir := "ahead of"
	if skew < 0 {
		dir = "behind"
	}
	r.Finding = fmt.Sprintf("the server's clock is %s %s this machine's (±%s)", roundDur(abs), dir, roundDur(rtt/2))
	uncertain := abs - rtt/2
	switch {
	case uncertain > skewFailOver:
		r.Status = statusFail
		r.Hint = "certificates are backdated by the server's clockSkew (default 2m) only: fix NTP on the server or this machine"
	case uncertain > limit:
		r.Status = statusWarn
		r.Hint = "fix NTP on the server or this machine before the skew exceeds the server's clockSkew (default 2m)"
	default:
		r.Status = statusOK
	}
	return r
}

// evalRBAC judges the SelfSubjectAccessReviews of every permission the
// server's roles grant: denied lists those refused to who.
func evalRBAC(who string, checked int, denied []string) checkResult {
	r := checkResult{Name: checkRBAC}
	if len(denied) == 0 {
		r.Status = statusOK
		r.Finding = fmt.Sprintf("%s has all %d permissions of deploy/manifests/castellan.yaml's roles", who, checked)
		return r
	}
	r.Status = statusFail
	r.Finding = fmt.Sprintf("%s lacks %d of %d permissions: %s", who, len(denied), checked, listNames(denied))
	r.Hint = "apply the ClusterRole and Roles of deploy/manifests/castellan.yaml (or the Helm chart) and bind them to the server's service account"
	return r
}

// skipped is a check that could not run because of err.
func skipped(name string, err error) checkResult {
	return checkResult{Status: statusSkip, Name: name, Finding: err.Error()}
}

// failed is a check that could not run because of err, a failure of its own.
func failedCheck(name, hint string, err error) checkResult {
	return checkResult{Status: statusFail, Name: name, Finding: err.Error(), Hint: hint}
}

// errNoAdmin is why checks that need the admin API are skipped.
var errNoAdmin = errors.New("needs the admin API, which could not be reached (see the server check)")

// roundDur renders d coarsely: days past two days, else hours, minutes or seconds.
func roundDur(d time.Duration) string {
	switch {
	case d >= 48*time.Hour:
		return fmt.Sprintf("%dd", int(d/(24*time.Hour)))
	case d >= 2*time.Hour:
		return fmt.Sprintf("%dh", int(d/time.Hour))
	case d >= 2*time.Minute:
		return fmt.Sprintf("%dm", int(d/time.Minute))
	case d >= time.Second:
		return d.Round(time.Second).String()
	}
	return d.Round(time.Millisecond).String()
}
