//go:build tools

// Package promcrd pins what the chart's monitoring test validates the
// PrometheusRule against: prometheus-operator's API types (its
// pkg/apis/monitoring module) and controller-gen, the tool prometheus-operator
// generates its CRDs from those types with. `make promcrd` runs it here.
package promcrd

import (
	_ "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	_ "sigs.k8s.io/controller-tools/cmd/controller-gen"
)
