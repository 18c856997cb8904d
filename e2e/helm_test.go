package e2e

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	cachedmemory "k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	"k8s.io/utils/ptr"
	sigsyaml "sigs.k8s.io/yaml"
)

// helmBinEnv names the helm binary `make helm` builds.
const helmBinEnv = "CASTELLAN_TEST_HELM_BIN"

// chartDir is the Castellan chart, relative to the e2e module.
const chartDir = "../deploy/helm/castellan"

// helmBin returns the helm binary, or skips the test when it is not
// configured (fails it when CI is set: CI must never silently skip).
func helmBin(t *testing.T) string {
	t.Helper()
	return madeFile(t, helmBinEnv, "builds helm", "make helm")
}

// madeFile returns the file envVar names, which `make e2e` provides (what
// says how), or skips the test when envVar is unset (fails it when CI is
// set: CI must never silently skip). A missing file fails, naming target.
func madeFile(t *testing.T, envVar, what, target string) string {
	t.Helper()
	p := os.Getenv(envVar)
	if p == "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not set; `make e2e` %s and sets it", envVar, what)
		}
		t.Skipf("%s is not set: run `make e2e`, which %s and sets it", envVar, what)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatalf("%s=%s: %v (run `%s`)", envVar, p, err, target)
	}
	return p
}

// runHelm runs helm with args and returns its stdout; stderr comes with the error.
func runHelm(t *testing.T, args ...string) ([]byte, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, helmBin(t), args...)
	// helm's own state (repositories, cache) stays in the test's temporary directory.
	home := t.TempDir()
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+home, "HELM_CONFIG_HOME="+home, "HELM_DATA_HOME="+home)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("helm %s: %w\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return stdout.Bytes(), nil
}

// helmTemplate renders chart as release in ns with the value files.
func helmTemplate(t *testing.T, chart, release, ns string, valueFiles ...string) ([]byte, error) {
	t.Helper()
	args := []string{"template", release, chart, "--namespace", ns}
	for _, f := range valueFiles {
		args = append(args, "--values", f)
	}
	return runHelm(t, args...)
}

// decodeObjects splits a multi-document YAML stream into objects (empty documents skipped).
func decodeObjects(data []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
	var out []*unstructured.Unstructured
	for {
		var m map[string]any
		if err := dec.Decode(&m); errors.Is(err, io.EOF) {
			return out, nil
		} else if err != nil {
			return nil, err
		}
		if len(m) == 0 {
			continue
		}
		out = append(out, &unstructured.Unstructured{Object: m})
	}
}

// applier applies objects with server-side apply, as `kubectl apply
// --server-side` does, optionally as a dry run the apiserver validates and
// admits in full without persisting.
type applier struct {
	dyn    dynamic.Interface
	mapper *restmapper.DeferredDiscoveryRESTMapper
}

func newApplier(t *testing.T, cfg *rest.Config) *applier {
	t.Helper()
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &applier{dyn: dyn, mapper: restmapper.NewDeferredDiscoveryRESTMapper(cachedmemory.NewMemCacheClient(dc))}
}

// apply applies every object; the first refusal is returned, naming the object.
func (a *applier) apply(ctx context.Context, objs []*unstructured.Unstructured, dryRun bool) error {
	for _, o := range objs {
		if err := a.applyOne(ctx, o, dryRun); err != nil {
			return err
		}
	}
	return nil
}

func (a *applier) applyOne(ctx context.Context, o *unstructured.Unstructured, dryRun bool) error {
	gvk := o.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		a.mapper.Reset() // CRDs applied a moment ago
		if m, err = a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version); err != nil {
			return fmt.Errorf("%s %s: %w", gvk.Kind, o.GetName(), err)
		}
	}
	var ri dynamic.ResourceInterface = a.dyn.Resource(m.Resource)
	if m.Scope.Name() == "namespace" {
		ri = a.dyn.Resource(m.Resource).Namespace(o.GetNamespace())
	}
	body, err := o.MarshalJSON()
	if err != nil {
		return err
	}
	opts := metav1.PatchOptions{FieldManager: "castellan-e2e", Force: ptr.To(true)}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	if _, err := ri.Patch(ctx, o.GetName(), types.ApplyPatchType, body, opts); err != nil {
		return &refusedObject{kind: gvk.Kind, namespace: o.GetNamespace(), name: o.GetName(), err: err}
	}
	return nil
}

// refusedObject is an object the apiserver refused.
type refusedObject struct {
	kind, namespace, name string
	err                   error
}

func (r *refusedObject) Error() string {
	return fmt.Sprintf("%s %s/%s refused: %v", r.kind, r.namespace, r.name, r.err)
}

func (r *refusedObject) Unwrap() error { return r.err }

// refusedValues names the chart values whose values the apiserver's refusal
// quotes ("Invalid value: 70000", `Invalid value: "two"`): the leaves of
// values (the value set under test, then the chart's defaults) that equal one
// of the quoted values.
func refusedValues(refusal string, valueSets ...map[string]any) []string {
	var quoted []string
	for rest := refusal; ; {
		i := strings.Index(rest, "Invalid value: ")
		if i < 0 {
			break
		}
		rest = rest[i+len("Invalid value: "):]
		end := strings.IndexAny(rest, ":,}")
		if end < 0 {
			end = len(rest)
		}
		quoted = append(quoted, strings.Trim(strings.TrimSpace(rest[:end]), `"`))
	}
	seen := map[string]bool{}
	var out []string
	for _, vs := range valueSets {
		for path, v := range flattenValues("", vs) {
			for _, q := range quoted {
				if q != "" && fmt.Sprint(v) == q && !seen[path] {
					seen[path] = true
					out = append(out, fmt.Sprintf("%s=%v", path, v))
				}
			}
		}
	}
	sort.Strings(out)
	return out
}

// flattenValues maps each leaf of a values tree to its dotted path.
func flattenValues(prefix string, v any) map[string]any {
	out := map[string]any{}
	switch x := v.(type) {
	case map[string]any:
		for k, c := range x {
			p := k
			if prefix != "" {
				p = prefix + "." + k
			}
			for kk, vv := range flattenValues(p, c) {
				out[kk] = vv
			}
		}
	case []any:
		for i, c := range x {
			for kk, vv := range flattenValues(fmt.Sprintf("%s[%d]", prefix, i), c) {
				out[kk] = vv
			}
		}
	default:
		out[prefix] = v
	}
	return out
}

// readValues reads a values file.
func readValues(t *testing.T, path string) map[string]any {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	if err := sigsyaml.Unmarshal(b, &m); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return m
}

// chartValueSets returns the documented value sets: name → file ("" for the
// defaults), from the chart's ci/ directory.
func chartValueSets(t *testing.T) map[string]string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(chartDir, "ci", "*-values.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no value sets in %s/ci: %v", chartDir, err)
	}
	sets := map[string]string{"defaults": ""}
	for _, f := range files {
		sets[strings.TrimSuffix(filepath.Base(f), "-values.yaml")] = f
	}
	return sets
}
