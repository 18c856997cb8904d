package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	"github.com/grafana/grafana-foundation-sdk/go/cog"
	"github.com/grafana/grafana-foundation-sdk/go/cog/plugins"
	grafanadashboard "github.com/grafana/grafana-foundation-sdk/go/dashboard"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/promql/parser"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

// promRuleCRDEnv names prometheus-operator's PrometheusRule CRD, which
// `make promcrd` generates from the operator's API types.
const promRuleCRDEnv = "CASTELLAN_TEST_PROMETHEUSRULE_CRD"

// dashboardFile is the chart's Grafana dashboard, relative to the e2e module.
const dashboardFile = chartDir + "/files/castellan-dashboard.json"

// monitoringValues turns both monitoring objects on (ci/monitoring-values.yaml).
const monitoringValues = chartDir + "/ci/monitoring-values.yaml"

// promRuleCRD returns the CRD file, or skips the test when it is not
// configured (fails it when CI is set).
func promRuleCRD(t *testing.T) string {
	t.Helper()
	return madeFile(t, promRuleCRDEnv, "generates the CRD", "make promcrd")
}

// installPromRuleCRD creates the PrometheusRule CRD and waits until the
// apiserver serves the kind.
func installPromRuleCRD(t *testing.T, env *kubeenv.Env, ap *applier) {
	t.Helper()
	b, err := os.ReadFile(promRuleCRD(t))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := decodeObjects(b)
	if err != nil || len(objs) != 1 || objs[0].GetKind() != "CustomResourceDefinition" {
		t.Fatalf("%s: %d objects, %v; want one CustomResourceDefinition", promRuleCRD(t), len(objs), err)
	}
	if err := ap.apply(t.Context(), objs, false); err != nil {
		t.Fatalf("PrometheusRule CRD: %v", err)
	}
	dyn, err := dynamic.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(eventualTimeout); ; time.Sleep(eventualPoll) {
		_, err := dyn.Resource(promRuleGVR).Namespace("default").List(t.Context(), metav1.ListOptions{})
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("PrometheusRules not served %v after the CRD was created: %v", eventualTimeout, err)
		}
	}
}

var promRuleGVR = schema.GroupVersionResource{Group: "monitoring.coreos.com", Version: "v1", Resource: "prometheusrules"}

// promRule is the part of a PrometheusRule the tests read.
type promRule struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert       string            `json:"alert"`
			Expr        string            `json:"expr"`
			For         string            `json:"for"`
			Labels      map[string]string `json:"labels"`
			Annotations map[string]string `json:"annotations"`
		} `json:"rules"`
	} `json:"groups"`
}

// grafanaDashboard holds every field the chart's dashboard uses; decoded
// with unknown fields refused, so a misspelt field fails the test.
type grafanaDashboard struct {
	Title         string   `json:"title"`
	UID           string   `json:"uid"`
	Description   string   `json:"description"`
	Tags          []string `json:"tags"`
	Editable      bool     `json:"editable"`
	GraphTooltip  int      `json:"graphTooltip"`
	SchemaVersion int      `json:"schemaVersion"`
	Version       int      `json:"version"`
	Refresh       string   `json:"refresh"`
	Time          struct {
		From string `json:"from"`
		To   string `json:"to"`
	} `json:"time"`
	Timezone    string `json:"timezone"`
	Annotations struct {
		List []any `json:"list"`
	} `json:"annotations"`
	Templating struct {
		List []struct {
			Name       string             `json:"name"`
			Type       string             `json:"type"`
			Label      string             `json:"label"`
			Query      any                `json:"query"`
			Definition string             `json:"definition"`
			Datasource *grafanaDatasource `json:"datasource"`
			Current    map[string]any     `json:"current"`
			Hide       int                `json:"hide"`
			IncludeAll bool               `json:"includeAll"`
			Multi      bool               `json:"multi"`
			AllValue   string             `json:"allValue"`
			Refresh    int                `json:"refresh"`
		} `json:"list"`
	} `json:"templating"`
	Panels []grafanaPanel `json:"panels"`
}

type grafanaDatasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

type grafanaPanel struct {
	ID          int                `json:"id"`
	Type        string             `json:"type"`
	Title       string             `json:"title"`
	Description string             `json:"description"`
	Collapsed   bool               `json:"collapsed"`
	Panels      []grafanaPanel     `json:"panels"`
	Datasource  *grafanaDatasource `json:"datasource"`
	GridPos     struct {
		H int `json:"h"`
		W int `json:"w"`
		X int `json:"x"`
		Y int `json:"y"`
	} `json:"gridPos"`
	Targets []struct {
		RefID        string             `json:"refId"`
		Expr         string             `json:"expr"`
		LegendFormat string             `json:"legendFormat"`
		Datasource   *grafanaDatasource `json:"datasource"`
	} `json:"targets"`
	FieldConfig struct {
		Defaults struct {
			Unit string   `json:"unit"`
			Min  *float64 `json:"min"`
			Max  *float64 `json:"max"`
		} `json:"defaults"`
		Overrides []any `json:"overrides"`
	} `json:"fieldConfig"`
	Options map[string]any `json:"options"`
}

// grafanaVariables are what Grafana puts in place of the dashboard's
// variables before it sends a query, as it does for an "All" selection.
var grafanaVariables = strings.NewReplacer("$__rate_interval", "5m", "$job", ".+")

// TestChartMonitoring checks the chart's optional monitoring objects: they
// render only when asked, with the configured sidecar label; the
// PrometheusRule passes prometheus-operator's own CRD schema (a strict
// server-side dry run against a real kube-apiserver); the dashboard passes
// Grafana's dashboard schema (the Grafana Foundation SDK's strict decoder)
// and is laid out soundly; every expression parses with
// Prometheus's parser; and every series they name is exported by a real
// castellan serve with Kubernetes on, after a certificate was issued and a
// call refused.
func TestChartMonitoring(t *testing.T) {
	helmBin(t)
	promRuleCRD(t)
	env := kubeenv.Start(t)

	byKind := func(objs []*unstructured.Unstructured, kind string) []*unstructured.Unstructured {
		var out []*unstructured.Unstructured
		for _, o := range objs {
			if o.GetKind() == kind {
				out = append(out, o)
			}
		}
		return out
	}
	dashboardCMs := func(objs []*unstructured.Unstructured) []*unstructured.Unstructured {
		var out []*unstructured.Unstructured
		for _, cm := range byKind(objs, "ConfigMap") {
			if _, ok, _ := unstructured.NestedString(cm.Object, "data", "castellan-dashboard.json"); ok {
				out = append(out, cm)
			}
		}
		return out
	}

	var (
		rule      promRule
		ruleObj   *unstructured.Unstructured
		dashboard grafanaDashboard
	)
	rendered := t.Run("render", func(t *testing.T) {
		defaults := renderChart(t)
		if n, m := len(byKind(defaults, "PrometheusRule")), len(dashboardCMs(defaults)); n != 0 || m != 0 {
			t.Errorf("defaults render %d PrometheusRules and %d dashboard ConfigMaps, want none", n, m)
		}
		on := renderChart(t, monitoringValues)
		rules, cms := byKind(on, "PrometheusRule"), dashboardCMs(on)
		if len(rules) != 1 || len(cms) != 1 {
			t.Fatalf("%s renders %d PrometheusRules and %d dashboard ConfigMaps, want 1 and 1", monitoringValues, len(rules), len(cms))
		}
		ruleObj = rules[0]
		if got := ruleObj.GetLabels()["release"]; got != "kube-prometheus-stack" {
			t.Errorf("PrometheusRule label release = %q, want the configured kube-prometheus-stack", got)
		}
		if got := cms[0].GetLabels()["grafana_dashboard"]; got != "1" {
			t.Errorf("dashboard ConfigMap label grafana_dashboard = %q, want \"1\" (Grafana's sidecar default)", got)
		}
		if got := cms[0].GetAnnotations()["grafana_folder"]; got != "Castellan" {
			t.Errorf("dashboard ConfigMap annotation grafana_folder = %q, want Castellan", got)
		}
		file, err := os.ReadFile(dashboardFile)
		if err != nil {
			t.Fatal(err)
		}
		data, _, _ := unstructured.NestedString(cms[0].Object, "data", "castellan-dashboard.json")
		if !bytes.Equal(bytes.TrimSpace([]byte(data)), bytes.TrimSpace(file)) {
			t.Errorf("the ConfigMap's dashboard differs from %s", dashboardFile)
		}
		dashboard = decodeDashboard(t, file)
		spec, _, _ := unstructured.NestedMap(ruleObj.Object, "spec")
		b, err := json.Marshal(spec)
		if err != nil {
			t.Fatal(err)
		}
		dec := json.NewDecoder(bytes.NewReader(b))
		if err := dec.Decode(&rule); err != nil {
			t.Fatalf("PrometheusRule spec: %v", err)
		}

		// The sidecar's label and the objects' namespaces are configurable.
		custom := writeFile(t, t.TempDir(), "values.yaml", []byte("monitoring:\n  grafanaDashboard:\n    enabled: true\n"+
			"    label: team_dashboards\n    labelValue: mesh\n    namespace: grafana\n  prometheusRule:\n    enabled: true\n    namespace: monitoring\n"), 0o600)
		objs := renderChart(t, custom)
		if cms := dashboardCMs(objs); len(cms) != 1 || cms[0].GetLabels()["team_dashboards"] != "mesh" || cms[0].GetNamespace() != "grafana" ||
			cms[0].GetLabels()["grafana_dashboard"] != "" {
			t.Errorf("custom sidecar label and namespace: dashboard ConfigMaps %v", names(cms))
		}
		if rules := byKind(objs, "PrometheusRule"); len(rules) != 1 || rules[0].GetNamespace() != "monitoring" {
			t.Errorf("custom namespace: PrometheusRules %v, want one in monitoring", names(rules))
		}
	})
	if !rendered {
		t.FailNow() // the rest checks what was rendered
	}

	t.Run("PrometheusRule schema", func(t *testing.T) {
		ap := newApplier(t, env.Config)
		installPromRuleCRD(t, env, ap)
		dyn, err := dynamic.NewForConfig(env.Config)
		if err != nil {
			t.Fatal(err)
		}
		create := func(o *unstructured.Unstructured) error {
			o.SetNamespace("default") // the namespace must exist, even for a dry run
			_, err := dyn.Resource(promRuleGVR).Namespace(o.GetNamespace()).Create(t.Context(), o,
				metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}, FieldValidation: "Strict"})
			return err
		}
		if err := create(ruleObj.DeepCopy()); err != nil {
			t.Fatalf("the apiserver refused the rendered PrometheusRule: %v", err)
		}
		// The check has teeth: what the schema forbids is refused.
		for name, breakIt := range map[string]func(rule map[string]any){
			"unknown field":    func(r map[string]any) { r["severty"] = "critical" },
			"bad for duration": func(r map[string]any) { r["for"] = "ten minutes" },
			"no expr":          func(r map[string]any) { delete(r, "expr") },
		} {
			bad := ruleObj.DeepCopy()
			groups, _, _ := unstructured.NestedSlice(bad.Object, "spec", "groups")
			rules := groups[0].(map[string]any)["rules"].([]any)
			breakIt(rules[0].(map[string]any))
			if err := unstructured.SetNestedSlice(bad.Object, groups, "spec", "groups"); err != nil {
				t.Fatal(err)
			}
			if err := create(bad); err == nil {
				t.Errorf("%s: the apiserver accepted the broken PrometheusRule", name)
			}
		}
	})

	t.Run("alerts", func(t *testing.T) {
		readme, err := os.ReadFile("../README.md")
		if err != nil {
			t.Fatal(err)
		}
		anchors := markdownAnchors(readme)
		var alerts []string
		for _, g := range rule.Groups {
			for _, r := range g.Rules {
				alerts = append(alerts, r.Alert)
				if sev := r.Labels["severity"]; sev != "critical" && sev != "warning" {
					t.Errorf("%s: severity %q, want critical or warning", r.Alert, sev)
				}
				if r.Labels["team"] != "mesh" {
					t.Errorf("%s: alertLabels not applied: %v", r.Alert, r.Labels)
				}
				for _, a := range []string{"summary", "description", "runbook_url"} {
					if strings.TrimSpace(r.Annotations[a]) == "" {
						t.Errorf("%s: no %s", r.Alert, a)
					}
				}
				_, anchor, _ := strings.Cut(r.Annotations["runbook_url"], "#")
				if anchor != strings.ToLower(r.Alert) || !anchors[anchor] {
					t.Errorf("%s: runbook_url %s: want README.md#%s, a section of the README", r.Alert, r.Annotations["runbook_url"], strings.ToLower(r.Alert))
				}
			}
		}
		// The alerts the chart promises (README, "Alerts").
		for _, want := range []string{"CastellanCAExpiringWithoutSuccessor", "CastellanIssuingCAExpiringSoon", "CastellanAuditAppendFailures",
			"CastellanSustainedUnavailable", "CastellanRootConfigMapsOutOfSync", "CastellanLeaderMissing", "CastellanBackendDown"} {
			if !slices.Contains(alerts, want) {
				t.Errorf("alert %s missing; rendered %v", want, alerts)
			}
		}
	})

	t.Run("dashboard", func(t *testing.T) {
		checkDashboard(t, dashboard)
		b, err := os.ReadFile(dashboardFile)
		if err != nil {
			t.Fatal(err)
		}
		if err := grafanaSchemaCheck(b); err != nil {
			t.Errorf("%s against Grafana's dashboard schema: %v", dashboardFile, err)
		}
		// The check has teeth: a misspelt panel field and a missing
		// required one are refused.
		for name, breakIt := range map[string]func(d map[string]any){
			"misspelt panel field": func(d map[string]any) { d["panels"].([]any)[1].(map[string]any)["titel"] = "x" },
			"no schemaVersion":     func(d map[string]any) { delete(d, "schemaVersion") },
		} {
			var d map[string]any
			if err := json.Unmarshal(b, &d); err != nil {
				t.Fatal(err)
			}
			breakIt(d)
			bad, err := json.Marshal(d)
			if err != nil {
				t.Fatal(err)
			}
			if grafanaSchemaCheck(bad) == nil {
				t.Errorf("%s: accepted by the schema check", name)
			}
		}
	})

	// Every expression, and the selectors in it.
	var exprs []string
	for _, g := range rule.Groups {
		for _, r := range g.Rules {
			exprs = append(exprs, r.Expr)
		}
	}
	for _, p := range dashboardPanels(dashboard.Panels) {
		for _, tg := range p.Targets {
			exprs = append(exprs, grafanaVariables.Replace(tg.Expr))
		}
	}
	var selectors []*parser.VectorSelector
	t.Run("promql", func(t *testing.T) {
		p := parser.NewParser(parser.Options{})
		for _, e := range exprs {
			ast, err := p.ParseExpr(e)
			if err != nil {
				t.Errorf("%s: %v", e, err)
				continue
			}
			parser.Inspect(ast, func(n parser.Node, _ []parser.Node) error {
				if vs, ok := n.(*parser.VectorSelector); ok {
					selectors = append(selectors, vs)
				}
				return nil
			})
		}
		if len(selectors) == 0 {
			t.Fatal("no selectors in the expressions")
		}
	})

	t.Run("series exported", func(t *testing.T) { checkSeriesExported(t, env, selectors) })
}

// decodeDashboard decodes the dashboard, refusing unknown fields.
func decodeDashboard(t *testing.T, b []byte) grafanaDashboard {
	t.Helper()
	var d grafanaDashboard
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&d); err != nil {
		t.Fatalf("%s: %v", dashboardFile, err)
	}
	return d
}

// grafanaSchemaCheck decodes a dashboard with the Grafana Foundation SDK's
// strict decoder: its types are generated from Grafana's own dashboard
// schema, and with the default plugins registered it checks each panel's
// options against its panel type (timeseries, stat) and each target against
// the Prometheus query schema. Unknown, missing required and mistyped fields
// are errors.
func grafanaSchemaCheck(b []byte) error {
	grafanaPlugins.Do(plugins.RegisterDefaultPlugins)
	var d grafanadashboard.Dashboard //nolint:staticcheck // the classic JSON model, which Grafana's sidecar provisioning reads; dashboardv2 is the v2 resource format
	err := d.UnmarshalJSONStrict(b)
	// It returns its error list as an error even when the list is empty.
	if be, ok := err.(cog.BuildErrors); ok && len(be) == 0 { //nolint:errorlint // the exact type, to spot the empty list
		return nil
	}
	return err
}

// grafanaPlugins registers the SDK's panel and query types once.
var grafanaPlugins sync.Once

// dashboardPanels returns the panels, rows' nested ones included, rows left out.
func dashboardPanels(ps []grafanaPanel) []grafanaPanel {
	var out []grafanaPanel
	for _, p := range ps {
		if p.Type == "row" {
			out = append(out, dashboardPanels(p.Panels)...)
			continue
		}
		out = append(out, p)
	}
	return out
}

// checkDashboard checks what Grafana needs of the dashboard: a title and
// uid, unique panel ids, panels on the 24-column grid without overlap, and
// on every panel the Prometheus data source variable and queries.
func checkDashboard(t *testing.T, d grafanaDashboard) {
	t.Helper()
	if d.Title == "" || d.UID == "" || d.SchemaVersion < 36 {
		t.Errorf("title %q, uid %q, schemaVersion %d: want both set and schemaVersion 36 or later", d.Title, d.UID, d.SchemaVersion)
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	if vars["datasource"] != "datasource" || vars["job"] != "query" {
		t.Errorf("variables %v, want datasource (datasource) and job (query)", vars)
	}
	ids := map[int]string{}
	type cell struct{ x, y int }
	taken := map[cell]string{}
	var walk func(ps []grafanaPanel)
	walk = func(ps []grafanaPanel) {
		for _, p := range ps {
			if prev, dup := ids[p.ID]; dup || p.ID <= 0 {
				t.Errorf("panel %q: id %d (also %q), want unique and positive", p.Title, p.ID, prev)
			}
			ids[p.ID] = p.Title
			g := p.GridPos
			if g.W <= 0 || g.H <= 0 || g.X < 0 || g.Y < 0 || g.X+g.W > 24 {
				t.Errorf("panel %q: gridPos %+v off the 24-column grid", p.Title, g)
			}
			for x := g.X; x < g.X+g.W; x++ {
				for y := g.Y; y < g.Y+g.H; y++ {
					if other, ok := taken[cell{x, y}]; ok {
						t.Errorf("panel %q overlaps %q at (%d, %d)", p.Title, other, x, y)
						y, x = g.Y+g.H, g.X+g.W
						continue
					}
					taken[cell{x, y}] = p.Title
				}
			}
			if p.Type == "row" {
				walk(p.Panels)
				continue
			}
			if !slices.Contains([]string{"timeseries", "stat"}, p.Type) || p.Title == "" || p.Description == "" {
				t.Errorf("panel %d: type %q, title %q, description %q", p.ID, p.Type, p.Title, p.Description)
			}
			ds := func(where string, d *grafanaDatasource) {
				if d == nil || d.Type != "prometheus" || d.UID != "${datasource}" {
					t.Errorf("panel %q %s: datasource %+v, want prometheus ${datasource}", p.Title, where, d)
				}
			}
			ds("", p.Datasource)
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no queries", p.Title)
			}
			refs := map[string]bool{}
			for _, tg := range p.Targets {
				ds("target "+tg.RefID, tg.Datasource)
				if tg.RefID == "" || refs[tg.RefID] || strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("panel %q: target refId %q (duplicate %v) expr %q", p.Title, tg.RefID, refs[tg.RefID], tg.Expr)
				}
				refs[tg.RefID] = true
				for _, v := range regexp.MustCompile(`\$\{?(\w+)`).FindAllStringSubmatch(tg.Expr, -1) {
					if _, ok := vars[v[1]]; !ok && !strings.HasPrefix(v[1], "__") {
						t.Errorf("panel %q uses undefined variable $%s", p.Title, v[1])
					}
				}
			}
		}
	}
	walk(d.Panels)
}

// markdownAnchors returns the anchors GitHub gives the headings of a
// Markdown document: lower case, punctuation dropped, spaces as hyphens.
func markdownAnchors(md []byte) map[string]bool {
	out := map[string]bool{}
	drop := regexp.MustCompile(`[^\p{L}\p{N} _-]`)
	for _, line := range strings.Split(string(md), "\n") {
		if !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.TrimSpace(strings.TrimLeft(line, "#"))
		out[strings.ReplaceAll(drop.ReplaceAllString(strings.ToLower(h), ""), " ", "-")] = true
	}
	return out
}

// checkSeriesExported runs castellan serve with Kubernetes on (TokenReview,
// root ConfigMaps, leader election), issues a certificate and has a call
// refused, then checks that /metrics has every metric the selectors name,
// with the labels they match on.
func checkSeriesExported(t *testing.T, env *kubeenv.Env, selectors []*parser.VectorSelector) {
	t.Helper()
	if len(selectors) == 0 {
		t.Fatal("no selectors to check")
	}
	kc := castellanKubeconfig(t, env, "mon-lease")
	const ns, sa = "mon-app", "sleep"
	env.CreateNamespace(t, ns, nil)
	env.CreateServiceAccount(t, ns, sa)
	pod := env.CreatePod(t, ns, "sleep-1", sa, "node-a")
	tok := env.Token(t, ns, sa, kubeenv.TokenOptions{Audiences: []string{"istio-ca"}, Pod: pod})
	srv := startServer(t, serverConfig{signer: "selfsigned", extraArgs: kubeArgs(kc, "tokenreview",
		"--leader-election-namespace", "mon-lease", "--intermediate-lifetime", "720h")})

	id := fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, ns, sa)
	if code, _ := sidecarSign(t, srv, tok, clusterID, id); code != codeOK {
		t.Fatalf("issuance: %s", code)
	}
	if code, _ := sidecarSign(t, srv, tok+"x", clusterID, id); code != "Unauthenticated" {
		t.Fatalf("call with a broken token: %s, want Unauthenticated", code)
	}

	var families map[string]*dto.MetricFamily
	// The leader gauge and the ConfigMap check need a moment after start.
	for deadline := time.Now().Add(eventualTimeout); ; time.Sleep(eventualPoll) {
		tp := expfmt.NewTextParser(model.UTF8Validation)
		var err error
		if families, err = tp.TextToMetricFamilies(bytes.NewReader(srv.scrape(t))); err != nil {
			t.Fatalf("/metrics: %v", err)
		}
		if leading(families, "root-configmaps") || time.Now().After(deadline) {
			break
		}
	}
	for _, vs := range selectors {
		fam, ok := seriesFamily(families, vs.Name)
		if !ok {
			t.Errorf("%s: no such metric in /metrics", vs)
			continue
		}
		for _, m := range vs.LabelMatchers {
			switch m.Name {
			case model.MetricNameLabel, "job", "instance": // target labels, added by Prometheus
				continue
			}
			if !hasLabel(fam, m.Name) {
				t.Errorf("%s: %s has no label %s", vs, fam.GetName(), m.Name)
			}
		}
	}
}

// seriesFamily returns the family a series name belongs to: itself, or a
// histogram's or summary's _bucket, _sum or _count.
func seriesFamily(families map[string]*dto.MetricFamily, name string) (*dto.MetricFamily, bool) {
	if f, ok := families[name]; ok && len(f.GetMetric()) > 0 {
		return f, true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		base, cut := strings.CutSuffix(name, suffix)
		f, ok := families[base]
		if !cut || !ok || len(f.GetMetric()) == 0 {
			continue
		}
		switch f.GetType() {
		case dto.MetricType_HISTOGRAM:
			return f, true
		case dto.MetricType_SUMMARY:
			return f, suffix != "_bucket"
		}
	}
	return nil, false
}

// hasLabel reports whether a series of f carries the label.
func hasLabel(f *dto.MetricFamily, label string) bool {
	for _, m := range f.GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == label {
				return true
			}
		}
	}
	return false
}

// leading reports whether castellan_leader{election} reads 1.
func leading(families map[string]*dto.MetricFamily, election string) bool {
	for _, m := range families["castellan_leader"].GetMetric() {
		for _, l := range m.GetLabel() {
			if l.GetName() == "election" && l.GetValue() == election && m.GetGauge().GetValue() == 1 {
				return true
			}
		}
	}
	return false
}
