//go:build tools

// Package kube pins kube-apiserver for the e2e tests: `go build` of
// k8s.io/kubernetes/cmd/kube-apiserver inside this module builds the real
// apiserver, since k8s.io/kubernetes cannot be `go install`ed directly.
package kube

import _ "k8s.io/kubernetes/cmd/kube-apiserver/app"
