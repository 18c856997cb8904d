package e2e

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/castellan-ca/castellan/e2e/internal/kubeenv"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// TestChart checks the Helm chart against a real kube-apiserver: helm lint
// and helm template for the defaults and every documented value set (the
// chart's ci/*-values.yaml, each referenced from deploy/README.md), every
// rendered object applied as a server-side dry run, which validates and
// admits it in full (prometheus-operator's PrometheusRule CRD is installed
// first). A value the apiserver refuses fails the test, naming the value.
func TestChart(t *testing.T) {
	helmBin(t)
	env := kubeenv.Start(t)
	// The namespaces an install needs first: the release's and istiod's.
	env.CreateNamespace(t, "castellan-system", nil)
	env.CreateNamespace(t, "istio-system", nil)
	ap := newApplier(t, env.Config)
	installPromRuleCRD(t, env, ap) // for ci/monitoring-values.yaml's PrometheusRule
	defaults := readValues(t, filepath.Join(chartDir, "values.yaml"))
	readme, err := os.ReadFile("../deploy/README.md")
	if err != nil {
		t.Fatal(err)
	}
	for name, file := range chartValueSets(t) {
		t.Run(name, func(t *testing.T) {
			var files []string
			user := map[string]any{}
			if file != "" {
				files, user = []string{file}, readValues(t, file)
				if ref := "ci/" + filepath.Base(file); !strings.Contains(string(readme), ref) {
					t.Errorf("deploy/README.md does not document the value set %s", ref)
				}
			}
			lint := []string{"lint", "--strict", chartDir}
			for _, f := range files {
				lint = append(lint, "--values", f)
			}
			if _, err := runHelm(t, lint...); err != nil {
				t.Errorf("helm lint: %v", err)
			}
			objs := renderChart(t, files...)
			if err := ap.apply(context.Background(), objs, true); err != nil {
				t.Fatalf("server-side dry run: %v\nvalues the apiserver refused: %v", err, refusedValues(err.Error(), user, defaults))
			}
			t.Logf("%d objects accepted", len(objs))
		})
	}

	// The plain manifests are the chart's defaults as generate.sh renders
	// them with this helm, and the apiserver accepts them.
	t.Run("plain manifests", func(t *testing.T) {
		out := filepath.Join(t.TempDir(), "castellan.yaml")
		cmd := exec.CommandContext(t.Context(), "../deploy/manifests/generate.sh", out)
		cmd.Env = append(os.Environ(), "PATH="+filepath.Dir(helmBin(t))+string(os.PathListSeparator)+os.Getenv("PATH"))
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("generate.sh: %v\n%s", err, b)
		}
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		committed, err := os.ReadFile("../deploy/manifests/castellan.yaml")
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, committed) {
			t.Errorf("deploy/manifests/castellan.yaml differs from the chart's defaults: run deploy/manifests/generate.sh")
		}
		objs, err := decodeObjects(committed)
		if err != nil {
			t.Fatal(err)
		}
		if err := ap.apply(t.Context(), objs, true); err != nil {
			t.Fatalf("server-side dry run of deploy/manifests/castellan.yaml: %v", err)
		}
	})

	// The check above names a refused value: a Service port out of range.
	t.Run("a refused value is named", func(t *testing.T) {
		bad := writeFile(t, t.TempDir(), "bad-values.yaml", []byte("service:\n  grpcPort: 70000\n"), 0o600)
		err := ap.apply(context.Background(), renderChart(t, bad), true)
		var refused *refusedObject
		if !errors.As(err, &refused) || refused.kind != "Service" {
			t.Fatalf("apply with grpcPort 70000 = %v, want the Service refused", err)
		}
		if got := refusedValues(err.Error(), readValues(t, bad), defaults); !slices.Equal(got, []string{"service.grpcPort=70000"}) {
			t.Errorf("refused values = %v, want [service.grpcPort=70000]\n%v", got, err)
		}
	})
}

// renderChart renders the chart as release castellan in castellan-system.
func renderChart(t *testing.T, valueFiles ...string) []*unstructured.Unstructured {
	t.Helper()
	out, err := helmTemplate(t, chartDir, "castellan", "castellan-system", valueFiles...)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := decodeObjects(out)
	if err != nil {
		t.Fatalf("helm template output: %v", err)
	}
	for _, o := range objs {
		if o.GetNamespace() == "" && namespaced(o.GetKind()) {
			o.SetNamespace("castellan-system") // helm template leaves the release namespace implicit
		}
	}
	return objs
}

// namespaced reports whether a kind the chart renders lives in a namespace.
func namespaced(kind string) bool {
	switch kind {
	case "ClusterRole", "ClusterRoleBinding", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding", "Namespace",
		"CustomResourceDefinition":
		return false
	}
	return true
}
