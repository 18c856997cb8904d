// Package manifests embeds the plain manifests (castellan.yaml, generated
// from the Helm chart) so that code needing what the chart grants, such as
// castellanctl doctor's RBAC check, reads it from the manifest itself rather
// than from a copy.
package manifests

import (
	"bytes"
	_ "embed" // castellan.yaml
	"errors"
	"fmt"
	"io"

	rbacv1 "k8s.io/api/rbac/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
)

//go:embed castellan.yaml
var castellanYAML []byte

// Grant is one ClusterRole (Namespace "") or Role of castellan.yaml.
type Grant struct {
	Kind, Name, Namespace string
	Rules                 []rbacv1.PolicyRule
}

// Grants returns the ClusterRoles and Roles of castellan.yaml, in file order.
func Grants() ([]Grant, error) { return parseGrants(castellanYAML) }

func parseGrants(b []byte) ([]Grant, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(b), 4096)
	var out []Grant
	for {
		var obj struct {
			Kind     string `json:"kind"`
			Metadata struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
			Rules []rbacv1.PolicyRule `json:"rules"`
		}
		err := dec.Decode(&obj)
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("manifests: castellan.yaml: %w", err)
		}
		if obj.Kind == "ClusterRole" || obj.Kind == "Role" {
			out = append(out, Grant{Kind: obj.Kind, Name: obj.Metadata.Name, Namespace: obj.Metadata.Namespace, Rules: obj.Rules})
		}
	}
}
