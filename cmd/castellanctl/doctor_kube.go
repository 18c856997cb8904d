package main

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/castellan-ca/castellan/deploy/manifests"
	"github.com/castellan-ca/castellan/internal/kubebundle"
	authzv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// loadKube reads the kubeconfig at path (nil, nil without one).
func loadKube(path, kubeContext string) (*rest.Config, error) {
	if path == "" {
		return nil, nil
	}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(&clientcmd.ClientConfigLoadingRules{ExplicitPath: path},
		&clientcmd.ConfigOverrides{CurrentContext: kubeContext}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig %s: %w", path, err)
	}
	// A few dozen reviews, once: client-go's default 5 requests/s would
	// make them take seconds.
	cfg.QPS, cfg.Burst = 50, 100
	return cfg, nil
}

// kubeBundleSources reads the root ConfigMaps of the selected namespaces and
// the ClusterTrustBundles Castellan manages (labelled
// kubebundle.ManagedByLabel), where the API is served. A cluster without any
// root ConfigMap is one where the server does not publish them: none is
// reported missing there.
func kubeBundleSources(ctx context.Context, cfg *rest.Config, nsSelector string) ([]bundleSource, error) {
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	if _, err := labels.Parse(nsSelector); err != nil {
		return nil, fmt.Errorf("--root-configmap-namespace-selector: %w", err)
	}
	nss, err := client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{LabelSelector: nsSelector})
	if err != nil {
		return nil, fmt.Errorf("list namespaces: %w", err)
	}
	cms, err := client.CoreV1().ConfigMaps("").List(ctx, metav1.ListOptions{
		FieldSelector: fields.OneTermEqualSelector("metadata.name", kubebundle.ConfigMapName).String()})
	if err != nil {
		return nil, fmt.Errorf("list %s ConfigMaps: %w", kubebundle.ConfigMapName, err)
	}
	byNS := make(map[string]*corev1.ConfigMap, len(cms.Items))
	for i := range cms.Items {
		byNS[cms.Items[i].Namespace] = &cms.Items[i]
	}
	var out []bundleSource
	selected := 0
	for _, ns := range nss.Items {
		if kubebundle.SkippedNamespace(ns.Name) || ns.Status.Phase == corev1.NamespaceTerminating {
			continue
		}
		selected++
		src := bundleSource{Name: "ConfigMap " + ns.Name + "/" + kubebundle.ConfigMapName, Kind: sourceConfigMap}
		if cm, ok := byNS[ns.Name]; ok {
			src.PEM = cm.Data[kubebundle.RootCertKey]
		} else {
			src.Err = errors.New("missing")
		}
		out = append(out, src)
	}
	if len(byNS) == 0 {
		out = nil // nothing published: rootConfigMaps is off
	}
	ctbs, err := clusterTrustBundles(ctx, cfg, client)
	if err != nil {
		return out, err
	}
	return append(out, ctbs...), nil
}

// clusterTrustBundles reads the ClusterTrustBundles Castellan manages; none
// where the apiserver serves no ClusterTrustBundle API.
func clusterTrustBundles(ctx context.Context, cfg *rest.Config, client kubernetes.Interface) ([]bundleSource, error) {
	gvr, err := kubebundle.BundleResource(client.Discovery())
	if errors.Is(err, kubebundle.ErrBundlesNotServed) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	list, err := dyn.Resource(gvr).List(ctx, metav1.ListOptions{LabelSelector: labels.SelectorFromSet(kubebundle.ManagedByLabel).String()})
	if err != nil {
		return nil, fmt.Errorf("list ClusterTrustBundles: %w", err)
	}
	var out []bundleSource
	for _, item := range list.Items {
		pem, _, _ := unstructured.NestedString(item.Object, "spec", "trustBundle")
		out = append(out, bundleSource{Name: "ClusterTrustBundle " + item.GetName(), Kind: sourceCTB, PEM: pem})
	}
	return out, nil
}

// doctorRBAC asks the apiserver, by SelfSubjectAccessReview, for every
// permission the ClusterRole and Roles of deploy/manifests/castellan.yaml
// grant, as the kubeconfig's identity or the one impersonated with --as.
func doctorRBAC(ctx context.Context, o doctorOptions) checkResult {
	cfg, err := loadKube(o.kubeconfig, o.kubeContext)
	switch {
	case err != nil:
		return failedCheck(checkRBAC, "give a readable kubeconfig (--kubeconfig, --context)", err)
	case cfg == nil:
		return skipped(checkRBAC, errNoKubeconfig)
	}
	who := "the kubeconfig's identity"
	if o.as != "" {
		cfg = rest.CopyConfig(cfg)
		cfg.Impersonate = rest.ImpersonationConfig{UserName: o.as}
		who = o.as
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return failedCheck(checkRBAC, "give a usable kubeconfig", err)
	}
	grants, err := manifests.Grants()
	if err != nil {
		return failedCheck(checkRBAC, "", err)
	}
	reviews := rbacReviews(grants, o.leaseNS, o.istiodCert)
	var denied []string
	for _, r := range reviews {
		res, err := client.AuthorizationV1().SelfSubjectAccessReviews().Create(ctx,
			&authzv1.SelfSubjectAccessReview{Spec: r.spec}, metav1.CreateOptions{})
		if err != nil {
			return failedCheck(checkRBAC, "the identity needs create on selfsubjectaccessreviews (every authenticated user has it); with --as, impersonate on users",
				fmt.Errorf("SelfSubjectAccessReview: %w", err))
		}
		if !res.Status.Allowed {
			denied = append(denied, r.what)
		}
	}
	return evalRBAC(who, len(reviews), denied)
}

// review is one permission to ask about and how it reads in a finding.
type review struct {
	spec authzv1.SelfSubjectAccessReviewSpec
	what string
}

// rbacReviews expands the rules of the server's ClusterRole and of its
// leader-election Role (in leaseNS) and, with istiod, of its istiod Role,
// into one review per verb, resource and name.
func rbacReviews(grants []manifests.Grant, leaseNS string, istiod bool) []review {
	var out []review
	for _, g := range grants {
		ns := g.Namespace
		switch {
		case g.Kind == "ClusterRole":
		case g.Name == "castellan-leader-election":
			ns = leaseNS
		case g.Name == "castellan-istiod-cert" && istiod:
		default:
			continue
		}
		for _, rule := range g.Rules {
			out = append(out, ruleReviews(rule, ns)...)
		}
	}
	return out
}

// ruleReviews expands one rule in namespace ns ("" cluster-wide).
func ruleReviews(rule rbacv1.PolicyRule, ns string) []review {
	var out []review
	for _, verb := range rule.Verbs {
		for _, path := range rule.NonResourceURLs {
			out = append(out, review{spec: authzv1.SelfSubjectAccessReviewSpec{NonResourceAttributes: &authzv1.NonResourceAttributes{Path: path, Verb: verb}},
				what: verb + " " + path})
		}
		for _, group := range rule.APIGroups {
			for _, res := range rule.Resources {
				resource, sub, _ := strings.Cut(res, "/")
				names := rule.ResourceNames
				if len(names) == 0 {
					names = []string{""}
				}
				for _, name := range names {
					what := verb + " " + res
					if group != "" {
						what += "." + group
					}
					if name != "" {
						what += " " + name
					}
					if ns != "" {
						what += " in " + ns
					}
					out = append(out, review{spec: authzv1.SelfSubjectAccessReviewSpec{ResourceAttributes: &authzv1.ResourceAttributes{
						Namespace: ns, Verb: verb, Group: group, Resource: resource, Subresource: sub, Name: name}}, what: what})
				}
			}
		}
	}
	return out
}
