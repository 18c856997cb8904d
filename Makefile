# Castellan build, test and tooling. `make test` is what CI runs (.ci/run):
# it installs the pinned tools it needs through the Go toolchain, into a cache
# outside the repository, so it works on a fresh machine with only Go.

SHELL        := /bin/bash
.DEFAULT_GOAL := all
.SHELLFLAGS  := -eu -o pipefail -c
GO           ?= go
# The Go toolchain every target builds and tests with. Go 1.26.8 (this
# machine's) has called vulnerabilities in crypto/x509, crypto/tls and net/http
# that govulncheck reports; 1.27.3 fixes them. The go command fetches it from
# the module proxy on first use (~76 MB, cached in the module cache); go.mod
# keeps `go 1.26.8` so that a plain `go build` with an older local Go still works.
GO_TOOLCHAIN ?= go1.27.3
export GOTOOLCHAIN := $(GO_TOOLCHAIN)
CACHE_DIR    ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/castellan
# Tools that load Go code (golangci-lint, govulncheck) must be built by the
# toolchain they analyse for, so the tool cache is kept per toolchain.
TOOLS        := $(CACHE_DIR)/tools/$(GO_TOOLCHAIN)
BIN          := $(CURDIR)/bin

BUF_VERSION                := v1.75.0
PROTOC_GEN_GO_VERSION      := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
GOLANGCI_LINT_VERSION      := v2.15.0
GOVULNCHECK_VERSION        := v1.9.0
# The Go vulnerability database as published in the golang.org/x/vulndb
# module (a pseudo-version: the repository has no tags). Bump it to pick up
# new advisories: `go list -m golang.org/x/vulndb@latest` names the newest.
VULNDB_VERSION             := v0.0.0-20261105234957-e22db6528018

BUF               := $(TOOLS)/buf-$(BUF_VERSION)/buf
PROTOC_GEN_GO     := $(TOOLS)/protoc-gen-go-$(PROTOC_GEN_GO_VERSION)/protoc-gen-go
PROTOC_GEN_GO_GRPC:= $(TOOLS)/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION)/protoc-gen-go-grpc
GOLANGCI_LINT     := $(TOOLS)/golangci-lint-$(GOLANGCI_LINT_VERSION)/golangci-lint
GOVULNCHECK       := $(TOOLS)/govulncheck-$(GOVULNCHECK_VERSION)/govulncheck
VULNDB_DIR        := $(CACHE_DIR)/vulndb-$(VULNDB_VERSION)
PROTO_PATH        := $(dir $(PROTOC_GEN_GO)):$(dir $(PROTOC_GEN_GO_GRPC)):$(PATH)

FUZZTIME ?= 10s
RUN_ARGS ?=

# Real components the tests run against (PostgreSQL, kube-apiserver + etcd,
# OpenBao, ...): each block below adds the target that builds or finds it to
# TEST_DEPS and the variable that tells the tests where it is to TEST_ENV;
# `e2e` takes all of them. A component that the service module's own tests
# use (grep CASTELLAN_TEST_ in its *_test.go and test helpers) also goes to
# UNIT_DEPS and UNIT_ENV, which are all that `unit` builds.
# Blocks must stay above the `unit` and `e2e` rules: prerequisites expand when read.
TEST_DEPS :=
TEST_ENV  :=
UNIT_DEPS :=
UNIT_ENV  :=

# --- real components (one block each) ---

# OpenBao (a Vault-API server) for signer/vault and the vault e2e, built from
# its Go module in a throwaway wrapper module (see ../shared/recipes/openbao.md):
# the pseudo-version is tag v2.4.0, the auth/*/v2 replaces pin modules its
# go.mod names at the never-published v2.0.0, and GONOSUMDB covers go-kms-wrapping
# modules the checksum database lacks.
OPENBAO_VERSION := v2.4.0
OPENBAO_PSEUDO  := v0.0.0-20250828202315-f9407a27fbee
BAO             := $(CACHE_DIR)/openbao-$(OPENBAO_VERSION)/bao
$(BAO):
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; cd "$$tmp"; \
	printf '%s\n' 'module openbaobuild' 'go 1.24' \
	  'require github.com/openbao/openbao $(OPENBAO_PSEUDO)' \
	  'replace github.com/openbao/openbao/api/auth/approle/v2 => github.com/openbao/openbao/api/auth/approle/v2 $(OPENBAO_VERSION)' \
	  'replace github.com/openbao/openbao/api/auth/userpass/v2 => github.com/openbao/openbao/api/auth/userpass/v2 $(OPENBAO_VERSION)' > go.mod; \
	GONOSUMDB=github.com/openbao/go-kms-wrapping CGO_ENABLED=0 \
	  $(GO) build -mod=mod -trimpath -o $@.tmp github.com/openbao/openbao; \
	mv $@.tmp $@
.PHONY: openbao
openbao: $(BAO)
TEST_DEPS += $(BAO)
TEST_ENV  += CASTELLAN_TEST_BAO_BIN=$(BAO)
UNIT_DEPS += $(BAO)
UNIT_ENV  += CASTELLAN_TEST_BAO_BIN=$(BAO)

# kube-apiserver + etcd for the Kubernetes e2e tests (authn/kube, node
# authorizer, root ConfigMaps), built from their Go modules by the wrapper
# modules in e2e/tools/kube and e2e/tools/etcd (see ../shared/recipes/kube.md)
# and cached per version outside the repository: the cold build (empty module
# and build caches) takes ~15 min of CPU time, so 8 min or more on 2 cores.
# One kube-apiserver release for every test (1.37: PodCertificateRequest and
# ClusterTrustBundle v1, certificates.k8s.io v1beta1 also served).
# Only the e2e module uses them, so `unit` does not build them.
KUBE_VERSION := v1.37.2
ETCD_VERSION := v3.5.21
KUBE_BIN_DIR := $(CACHE_DIR)/kube-$(KUBE_VERSION)-etcd-$(ETCD_VERSION)
KUBE_LDFLAGS := -X k8s.io/component-base/version.gitVersion=$(KUBE_VERSION) \
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37
$(KUBE_BIN_DIR)/kube-apiserver:
	mkdir -p $(@D)
	cd e2e/tools/kube && CGO_ENABLED=0 $(GO) build -mod=mod -trimpath -ldflags '$(KUBE_LDFLAGS)' \
	  -o $@.tmp k8s.io/kubernetes/cmd/kube-apiserver \
	  || { echo "cannot build kube-apiserver $(KUBE_VERSION) from the module proxy" >&2; exit 1; }
	mv $@.tmp $@
$(KUBE_BIN_DIR)/etcd:
	mkdir -p $(@D)
	cd e2e/tools/etcd && CGO_ENABLED=0 $(GO) build -mod=mod -trimpath -o $@.tmp . \
	  || { echo "cannot build etcd $(ETCD_VERSION) from the module proxy" >&2; exit 1; }
	mv $@.tmp $@
.PHONY: kube
kube: $(KUBE_BIN_DIR)/kube-apiserver $(KUBE_BIN_DIR)/etcd
TEST_DEPS += kube
TEST_ENV  += CASTELLAN_TEST_KUBE_BIN_DIR=$(KUBE_BIN_DIR)

# PostgreSQL 15 server binaries (Debian's postgresql-15) for storage/postgres,
# the fault test and the audit benchmarks: the tests start throwaway clusters
# from them (../shared/recipes/postgres.md), unless CASTELLAN_TEST_POSTGRES_DSN
# names a server. Installed with apt-get when missing and possible.
PG_BIN_DIR := /usr/lib/postgresql/15/bin
.PHONY: postgres
postgres:
	@if [ -n "$${CASTELLAN_TEST_POSTGRES_DSN:-}" ] || [ -x $(PG_BIN_DIR)/initdb ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "PostgreSQL 15 not found in $(PG_BIN_DIR): install postgresql-15 or set CASTELLAN_TEST_POSTGRES_DSN" >&2; exit 1; fi; \
	echo "installing postgresql-15 (server binaries for the audit store tests)" >&2; \
	{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15; } \
	  || { echo "cannot install postgresql-15: install it or set CASTELLAN_TEST_POSTGRES_DSN" >&2; exit 1; }; \
	[ -x $(PG_BIN_DIR)/initdb ] || { echo "postgresql-15 installed but $(PG_BIN_DIR)/initdb is missing" >&2; exit 1; }
bench: postgres
TEST_DEPS += postgres
TEST_ENV  += CASTELLAN_TEST_POSTGRES_BIN_DIR=$(PG_BIN_DIR)
UNIT_DEPS += postgres
UNIT_ENV  += CASTELLAN_TEST_POSTGRES_BIN_DIR=$(PG_BIN_DIR)

# Istio's own control plane for the istiod e2e (../shared/recipes/istio-control-plane.md):
# pilot-discovery (istiod) and pilot-agent, built from the istio.io/istio
# version the e2e module requires (its go.mod lists both as tools), inside the
# e2e module and with the flags its tests build with, so the packages they share
# with the e2e tests (Istio's agent, security and xDS code, client-go, gRPC)
# compile once into the one build cache. Cached per Istio version. Measured
# with an empty build cache (module cache filled): 594 s user + 107 s sys of
# CPU, most of it pilot-discovery (18.5 min wall at nice 19 on 2 busy shared
# cores); with a warm build cache, 1.5 min of CPU, mostly linking. The e2e tests also read Istio's CRDs and charts from
# that module's manifests/ (ISTIO_MOD_DIR, in the module cache once it is built).
ISTIO_VERSION := $(shell sed -n 's|^[[:space:]]*istio.io/istio \(v[^[:space:]]*\).*|\1|p' e2e/go.mod)
ISTIO_BIN_DIR := $(CACHE_DIR)/istio-$(ISTIO_VERSION)
$(ISTIO_BIN_DIR)/pilot-discovery $(ISTIO_BIN_DIR)/pilot-agent:
	mkdir -p $(@D)
	cd e2e && $(GO) build -ldflags '-s -w' -o $@.tmp istio.io/istio/pilot/cmd/$(@F) \
	  || { echo "cannot build $(@F) of istio.io/istio $(ISTIO_VERSION) in the e2e module" >&2; exit 1; }
	mv $@.tmp $@
.PHONY: istio
istio: $(ISTIO_BIN_DIR)/pilot-discovery $(ISTIO_BIN_DIR)/pilot-agent
TEST_DEPS += istio
TEST_ENV  += CASTELLAN_TEST_ISTIO_BIN_DIR=$(ISTIO_BIN_DIR) CASTELLAN_TEST_ISTIO_MOD_DIR=$$(cd $(CURDIR)/e2e && $(GO) list -m -f '{{.Dir}}' istio.io/istio)

# helm, built from its Go module, for the chart tests (helm lint, helm template
# of every documented value set, rendered objects applied to the e2e
# kube-apiserver). Cached per version. Measured with an empty build cache
# (module cache filled): 327 s user + 63 s sys of CPU.
HELM_VERSION := v4.3.2
HELM         := $(CACHE_DIR)/helm-$(HELM_VERSION)/helm
$(HELM):
	mkdir -p $(@D)
	GOBIN=$(@D) $(GO) install -ldflags '-s -w' helm.sh/helm/v4/cmd/helm@$(HELM_VERSION) \
	  || { echo "cannot build helm $(HELM_VERSION) from the module proxy" >&2; exit 1; }
.PHONY: helm
helm: $(HELM)
TEST_DEPS += $(HELM)
TEST_ENV  += CASTELLAN_TEST_HELM_BIN=$(HELM)

# prometheus-operator's PrometheusRule CRD, for the chart's monitoring test
# (TestChartMonitoring): the rendered rule is created as a server-side dry
# run against it, which validates it against the operator's own schema. It is
# generated by controller-gen, the tool prometheus-operator makes its CRDs
# with, from the operator's API types (its pkg/apis/monitoring module), both
# pinned in e2e/tools/promcrd. Cached per version. Measured cold (empty module
# and build caches): 1.5 min wall, 42 s user CPU.
PROM_OPERATOR_VERSION := $(shell sed -n 's|^[[:space:]]*github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring \(v[^[:space:]]*\).*|\1|p' e2e/tools/promcrd/go.mod)
PROM_CRD_DIR := $(CACHE_DIR)/prometheus-operator-crds-$(PROM_OPERATOR_VERSION)
PROM_RULE_CRD := $(PROM_CRD_DIR)/monitoring.coreos.com_prometheusrules.yaml
$(PROM_RULE_CRD):
	rm -rf $(@D).tmp
	cd e2e/tools/promcrd && $(GO) run sigs.k8s.io/controller-tools/cmd/controller-gen crd \
	  paths=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1 output:crd:dir=$(@D).tmp \
	  || { echo "cannot generate prometheus-operator $(PROM_OPERATOR_VERSION)'s CRDs from the module proxy" >&2; exit 1; }
	rm -rf $(@D) && mv $(@D).tmp $(@D)
.PHONY: promcrd
promcrd: $(PROM_RULE_CRD)
TEST_DEPS += $(PROM_RULE_CRD)
TEST_ENV  += CASTELLAN_TEST_PROMETHEUSRULE_CRD=$(PROM_RULE_CRD)

# SoftHSM2 (Debian's softhsm2), a real PKCS#11 token for the CA-key tests
# (signer/cakey, the selfsigned, intermediate and rotation tests, the HSM e2e):
# each test binary initialises a throwaway token directory of its own
# (../shared/recipes/softhsm.md). PKCS#11 needs cgo, so gcc comes along when
# missing. Installed with apt-get when missing and possible.
SOFTHSM_MODULE := /usr/lib/softhsm/libsofthsm2.so
.PHONY: softhsm
softhsm:
	@if [ -r $(SOFTHSM_MODULE) ] && command -v softhsm2-util >/dev/null && command -v gcc >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "SoftHSM2 ($(SOFTHSM_MODULE), softhsm2-util) or gcc not found: install softhsm2 and gcc" >&2; exit 1; fi; \
	echo "installing softhsm2 and gcc (a PKCS#11 token for the CA key tests, and cgo to reach it)" >&2; \
	{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends softhsm2 gcc libc6-dev; } \
	  || { echo "cannot install softhsm2 and gcc" >&2; exit 1; }; \
	[ -r $(SOFTHSM_MODULE) ] || { echo "softhsm2 installed but $(SOFTHSM_MODULE) is missing" >&2; exit 1; }
bench: softhsm
TEST_DEPS += softhsm
TEST_ENV  += CASTELLAN_TEST_SOFTHSM_MODULE=$(SOFTHSM_MODULE)
UNIT_DEPS += softhsm
UNIT_ENV  += CASTELLAN_TEST_SOFTHSM_MODULE=$(SOFTHSM_MODULE)

# zsh (Debian's zsh) so that castellanctl's zsh completion script is parsed by
# zsh itself (cmd/castellanctl TestCompletionScriptsParse skips without it).
# Installed with apt-get when missing and possible; otherwise only that check skips.
.PHONY: zsh
zsh:
	@if command -v zsh >/dev/null; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "zsh not found: the zsh completion check will be skipped" >&2; exit 0; fi; \
	echo "installing zsh (to parse castellanctl's zsh completion script)" >&2; \
	{ apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends zsh; } \
	  || { echo "cannot install zsh" >&2; exit 1; }
UNIT_DEPS += zsh

# --- end of real components ---

.PHONY: all run build test lint fmt-check golangci-lint tidy-check vuln proto proto-check proto-breaking tools unit fuzz e2e bench clean

# The Go modules that lint, vuln and tidy-check cover: the service and e2e/.
GO_MODULES := . e2e

all: build

## run: the CA on its embedded defaults (self-signed root, SQLite audit log, per-user data dir)
run:
	$(GO) run ./cmd/castellan serve $(RUN_ARGS)

## build: both binaries into ./bin
build:
	$(GO) build -o $(BIN)/ ./cmd/castellan ./cmd/castellanctl

## test: everything CI checks
test: lint tidy-check proto-check vuln unit fuzz e2e

tools: $(BUF) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC) $(GOLANGCI_LINT) $(GOVULNCHECK)

$(BUF):
	GOBIN=$(dir $@) $(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(PROTOC_GEN_GO):
	GOBIN=$(dir $@) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(PROTOC_GEN_GO_GRPC):
	GOBIN=$(dir $@) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
$(GOLANGCI_LINT):
	GOBIN=$(dir $@) $(GO) install github.com/golangci/golangci-lint/v2/cmd/golangci-lint@$(GOLANGCI_LINT_VERSION)
$(GOVULNCHECK):
	GOBIN=$(dir $@) $(GO) install golang.org/x/vuln/cmd/govulncheck@$(GOVULNCHECK_VERSION)

## proto: regenerate the committed Go code from proto/
proto: $(BUF) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
	PATH=$(PROTO_PATH) $(BUF) generate

## proto-check: fail when the committed generated code is stale, or the protos break lint or compatibility
proto-check: proto-breaking $(BUF) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
	$(BUF) lint
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	PATH=$(PROTO_PATH) $(BUF) generate -o "$$tmp"; \
	if ! diff -r -x '*.proto' "$$tmp/proto" proto; then \
	  echo "generated code in proto/ is stale: run 'make proto' and commit" >&2; exit 1; fi

## proto-breaking: `buf breaking` (rules in buf.yaml) against the newest release tag (v*) reachable
## from HEAD; without one, against the main commit this branch starts from, or on main itself
## against main's previous commit. BUF_AGAINST=<buf input> overrides the baseline.
# The baseline is taken from git's own objects (git archive), not from buf's
# '.git#ref=' input, which clones the repository again to a fixed depth and
# so misses an older baseline. A shallow clone is deepened from its remote
# first; with no reachable remote (or on the first commit) the check says it
# is skipped and why, rather than failing a build that has nothing to compare.
BUF_AGAINST ?=
proto-breaking: $(BUF)
	@if [ -n '$(BUF_AGAINST)' ]; then \
	  echo "buf breaking against $(BUF_AGAINST)"; exec $(BUF) breaking --against '$(BUF_AGAINST)'; fi; \
	if [ "$$(git rev-parse --is-shallow-repository 2>/dev/null)" = true ]; then \
	  echo "proto-breaking: shallow clone; fetching its history for the baseline" >&2; \
	  timeout 120 git fetch --quiet --unshallow --tags 2>/dev/null || true; \
	  [ "$$(git rev-parse --is-shallow-repository)" = false ] \
	    || echo "proto-breaking: still shallow: no reachable remote to fetch the history from" >&2; \
	fi; \
	if tag=$$(git describe --tags --abbrev=0 --match 'v[0-9]*' HEAD 2>/dev/null); then \
	  base=$$tag; what="release tag $$tag"; \
	else \
	  fork=$$(git merge-base HEAD main 2>/dev/null || git merge-base HEAD origin/main 2>/dev/null || true); \
	  if [ -n "$$fork" ] && [ "$$fork" != "$$(git rev-parse HEAD)" ]; then \
	    base=$$fork; what="main at $$(git rev-parse --short $$fork) (where this branch starts)"; \
	  else \
	    base=$$(git rev-parse --verify --quiet 'HEAD~1^{commit}' || true); \
	    what="the previous commit $$(git rev-parse --short "$${base:-HEAD}" 2>/dev/null || true)"; \
	  fi; \
	fi; \
	if [ -z "$$base" ] || ! git cat-file -e "$$base^{commit}" 2>/dev/null; then \
	  echo "proto-breaking: SKIPPED: no baseline commit here (not a git checkout, a shallow clone without its history, or the first commit); fetch the history or set BUF_AGAINST" >&2; exit 0; fi; \
	if ! git cat-file -e "$$base:buf.yaml" 2>/dev/null; then \
	  echo "proto-breaking: SKIPPED: $$what has no buf.yaml, nothing to compare" >&2; exit 0; fi; \
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	git archive "$$base" | tar -x -C "$$tmp"; \
	echo "buf breaking against $$what"; \
	$(BUF) breaking --against "$$tmp"

## lint: gofmt, then golangci-lint (.golangci.yml: go vet, staticcheck, gosec, errorlint, ...) on both modules
lint: fmt-check golangci-lint

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:" >&2; echo "$$out" >&2; exit 1; fi

# Both modules are linted even when the first has findings, so one run lists them all.
golangci-lint: $(GOLANGCI_LINT)
	@rc=0; for m in $(GO_MODULES); do \
	  echo "golangci-lint $$m"; \
	  (cd $$m && $(GOLANGCI_LINT) run -c $(CURDIR)/.golangci.yml ./...) || rc=1; \
	done; exit $$rc

## tidy-check: fail when a module's go.mod/go.sum differ from what `go mod tidy` makes them
# e2e/tools/kube is left out: tidy there needs -e (the proxy refuses some
# test-only dependency versions of k8s packages), and what it then adds to
# go.sum depends on which of those the proxy serves that day.
TIDY_MODULES := $(GO_MODULES) e2e/tools/etcd e2e/tools/promcrd
tidy-check:
	@rc=0; for m in $(TIDY_MODULES); do \
	  echo "go mod tidy -diff ($$m)"; \
	  (cd $$m && $(GO) mod tidy -diff) \
	    || { echo "$$m: go.mod/go.sum are not tidy: run 'cd $$m && go mod tidy' and commit" >&2; rc=1; }; \
	done; exit $$rc

## vuln: govulncheck on the service module; fails on a known vulnerability the code calls, unless
## VULN_ACCEPT lists it. GOVULNDB=https://vuln.go.dev uses the live database where reachable.
# The database is built from the pinned golang.org/x/vulndb module (its OSV
# files, indexed by the module's own cmd/indexdb) and cached per version, so
# the result depends on the commit and VULNDB_VERSION only, and it works with
# nothing but the Go module proxy. Its entries carry no modified dates (the
# module has no git history), which govulncheck does not need.
GOVULNDB ?= file://$(VULNDB_DIR)
# Called vulnerabilities accepted for now, one line each with the reason:
#   VULN_ACCEPT += GO-YYYY-NNNN # why it does not apply, or what it waits for
VULN_ACCEPT :=
# Only the service module ships: e2e/ is a test harness (Istio, Kubernetes
# client code) whose scan costs ~20 minutes and ~6 GB for code no user runs.
VULN_MODULES := .
vuln: $(GOVULNCHECK) $(if $(filter file://$(VULNDB_DIR),$(GOVULNDB)),$(VULNDB_DIR)/index/db.json)
	@rc=0; out=$$(mktemp); trap 'rm -f "$$out"' EXIT; for m in $(VULN_MODULES); do \
	  echo "govulncheck $$m (database $(GOVULNDB))"; \
	  set +e; (cd $$m && $(GOVULNCHECK) -db '$(GOVULNDB)' ./...) 2>&1 | tee "$$out"; st=$${PIPESTATUS[0]}; set -e; \
	  case $$st in \
	  0) ;; \
	  3) ids=$$(sed -n 's/^Vulnerability #[0-9]*: \(GO-[0-9-]*\)$$/\1/p' "$$out" | sort -u); \
	     [ -n "$$ids" ] || { echo "$$m: govulncheck found called vulnerabilities but their IDs could not be read" >&2; rc=1; }; \
	     for id in $$ids; do \
	       case " $(strip $(VULN_ACCEPT)) " in \
	       *" $$id "*) echo "$$m: $$id is called; accepted in VULN_ACCEPT";; \
	       *) echo "$$m: $$id is called: move to the fixed version (module or Go) or accept it in VULN_ACCEPT with a reason" >&2; rc=1;; \
	       esac; \
	     done;; \
	  *) echo "$$m: govulncheck failed (exit $$st)" >&2; rc=1;; \
	  esac; \
	done; exit $$rc

$(VULNDB_DIR)/index/db.json:
	mkdir -p $(CACHE_DIR)
	tmp=$$(mktemp -d $(CACHE_DIR)/.vulndb.XXXXXX); trap 'rm -rf "$$tmp"' EXIT; \
	src=$$(cd "$$tmp" && $(GO) mod download -json golang.org/x/vulndb@$(VULNDB_VERSION) \
	  | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$$/\1/p') && [ -d "$$src/data/osv" ] \
	  || { echo "cannot fetch golang.org/x/vulndb@$(VULNDB_VERSION) from the Go module proxy, so govulncheck has no vulnerability database; where vuln.go.dev is reachable: make vuln GOVULNDB=https://vuln.go.dev" >&2; exit 1; }; \
	(cd "$$tmp" && $(GO) run golang.org/x/vulndb/cmd/indexdb@$(VULNDB_VERSION) -vulns "$$src/data/osv" -out "$$tmp/db") \
	  || { echo "cannot build the govulncheck database from golang.org/x/vulndb@$(VULNDB_VERSION)" >&2; exit 1; }; \
	rm -rf $(VULNDB_DIR); mv "$$tmp/db" $(VULNDB_DIR)

## unit: the service module's tests, with the race detector, in random order (a failing
## package prints its seed: -shuffle=SEED repeats the order); builds only the components those tests use
unit: $(UNIT_DEPS)
	$(UNIT_ENV) $(GO) test -race -count=1 -shuffle=on -timeout 30m ./...

## fuzz: every fuzz target, briefly (FUZZTIME each), seeded by its corpus
fuzz:
	for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' "$$pkg" | grep '^Fuzz' || true); do \
	    echo "fuzz $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) "$$pkg"; \
	  done; \
	done

## e2e: the real binaries driven by Istio's real CA client (separate module under e2e/), in random order
e2e: build $(TEST_DEPS)
	cd e2e && $(TEST_ENV) CASTELLAN_BIN=$(BIN)/castellan CASTELLANCTL_BIN=$(BIN)/castellanctl $(GO) test -count=1 -shuffle=on -timeout 30m ./...

## bench: issuance pipeline benchmarks (numbers go to BENCHMARKS.md)
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./ca/ ./storage/... ./signer/cakey/

## loadgen: 32 mTLS clients against Castellan with the embedded store, Castellan with the
## PostgreSQL store (a throwaway server, fsync on, its CPU counted) and Istio's own CA, back to
## back with the same client, one table; not part of `make test`. Numbers and method: BENCHMARKS.md.
## loadgen-storm: a node-restart storm through the e2e kube-apiserver; loadgen-overload: 4x the
## sustainable rate, then recovery.
LOADGEN_ARGS ?= -clients 32 -duration 30s
STORM_ARGS ?= -storm-pods 1000 -storm-nodes 10 -storm-rounds 2
OVERLOAD_ARGS ?= -clients 32 -overload-factor 4
.PHONY: loadgen loadgen-bin loadgen-storm loadgen-overload
loadgen-bin: build
	cd e2e && $(GO) build -o $(BIN)/loadgen ./loadgen
loadgen: loadgen-bin postgres
	$(BIN)/loadgen -mode compare -castellan-bin $(BIN)/castellan $(LOADGEN_ARGS)
loadgen-storm: loadgen-bin kube
	$(BIN)/loadgen -mode storm -castellan-bin $(BIN)/castellan -kube-bin-dir $(KUBE_BIN_DIR) $(STORM_ARGS)
loadgen-overload: loadgen-bin
	$(BIN)/loadgen -mode overload -castellan-bin $(BIN)/castellan $(OVERLOAD_ARGS)

## profile: CPU and allocation profiles of the real binary (embedded audit, --debug-pprof)
## under the load generator (32 clients), into $(PROFILE_DIR)/, then profile-top.
## PROFILE_BIN profiles another build (e.g. the previous commit's, for a same-run comparison).
## Not part of `make test`. Breakdown and method: BENCHMARKS.md, "Hot path profile".
PROFILE_DIR        ?= profile
PROFILE_BIN        ?= $(BIN)/castellan
PROFILE_SECONDS    ?= 20
PROFILE_CLIENTS    ?= 32
PROFILE_LISTEN     ?= 127.0.0.1:18012
PROFILE_MONITORING ?= 127.0.0.1:18014
PROFILE_ARGS       ?=
.PHONY: profile profile-top
profile: build
	cd e2e && $(GO) build -o $(BIN)/loadgen ./loadgen
	mkdir -p $(PROFILE_DIR)
	cp $(PROFILE_BIN) $(PROFILE_DIR)/castellan.bin
	data=$$(mktemp -d); mon=http://$(PROFILE_MONITORING); \
	$(PROFILE_DIR)/castellan.bin serve --data-dir "$$data" --listen $(PROFILE_LISTEN) --monitoring-listen $(PROFILE_MONITORING) \
	  --log-level warn --caller-rate-limit 0 --debug-pprof $(PROFILE_ARGS) > $(PROFILE_DIR)/castellan.log 2>&1 & srv=$$!; \
	trap 'kill $$srv 2>/dev/null; wait $$srv 2>/dev/null; rm -rf "$$data"' EXIT; \
	for i in $$(seq 100); do curl -fsS -o /dev/null $$mon/readyz 2>/dev/null && break; sleep 0.2; done; \
	curl -fsS -o /dev/null $$mon/readyz || { cat $(PROFILE_DIR)/castellan.log >&2; exit 1; }; \
	$(BIN)/loadgen -mode castellan -data-dir "$$data" -pid $$srv -clients $(PROFILE_CLIENTS) \
	  -duration $$(( $(PROFILE_SECONDS) + 6 ))s -report 0 > $(PROFILE_DIR)/loadgen.txt 2>&1 & lg=$$!; \
	sleep 5; echo "load average at start: $$(cut -d' ' -f1-3 /proc/loadavg)" | tee $(PROFILE_DIR)/loadavg.txt; \
	curl -fsS -o $(PROFILE_DIR)/allocs.pprof "$$mon/debug/pprof/allocs?seconds=$(PROFILE_SECONDS)" & al=$$!; \
	curl -fsS -o $(PROFILE_DIR)/cpu.pprof "$$mon/debug/pprof/profile?seconds=$(PROFILE_SECONDS)"; wait $$al; \
	echo "load average at end: $$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a $(PROFILE_DIR)/loadavg.txt; \
	wait $$lg || { cat $(PROFILE_DIR)/loadgen.txt >&2; exit 1; }; cat $(PROFILE_DIR)/loadgen.txt
	$(MAKE) --no-print-directory profile-top PROFILE_DIR=$(PROFILE_DIR)

## profile-top: the `go tool pprof -top` summaries and the category breakdown of $(PROFILE_DIR)/
profile-top:
	$(GO) tool pprof -top -nodecount 40 $(PROFILE_DIR)/castellan.bin $(PROFILE_DIR)/cpu.pprof | tee $(PROFILE_DIR)/cpu-top.txt
	$(GO) tool pprof -top -cum -nodecount 80 $(PROFILE_DIR)/castellan.bin $(PROFILE_DIR)/cpu.pprof > $(PROFILE_DIR)/cpu-top-cum.txt
	$(GO) tool pprof -top -sample_index alloc_space -nodecount 25 $(PROFILE_DIR)/castellan.bin $(PROFILE_DIR)/allocs.pprof | tee $(PROFILE_DIR)/allocs-top.txt
	@echo "breakdown (share of the server's CPU samples whose stack holds the function; categories overlap):" | tee $(PROFILE_DIR)/breakdown.txt
	@while IFS=';' read -r name focus ignore; do \
	  share=$$($(GO) tool pprof -top -nodefraction 0 -nodecount 1000000 -focus "$$focus" $${ignore:+-ignore "$$ignore"} \
	    $(PROFILE_DIR)/castellan.bin $(PROFILE_DIR)/cpu.pprof 2>/dev/null | sed -n 's/^Showing nodes accounting for \([^,]*\), \([0-9.]*%\) of.*/\2 (\1)/p'); \
	  printf '  %-62s %s\n' "$$name" "$${share:-0%}"; \
	done < <(printf '%s\n' \
	  'ECDSA verification (all);ecdsa\.VerifyASN1;' \
	  '  of which the CSR signature check;CertificateRequest\)\.CheckSignature;' \
	  '  of which x509.CreateCertificate re-checking its signature;x509\.checkSignature;CertificateRequest\)\.CheckSignature' \
	  'leaf signing (ECDSA sign);ecdsa\.SignASN1;' \
	  'leaf path in the signer (encode, sign, parse);local\.\(\*Signer\)\.Sign$$;' \
	  'audit commit path (embedded SQLite writeBatch);embedded\.\(\*Store\)\.writeBatch;' \
	  'syscalls (socket I/O, fsync);Syscall6;' \
	  'encoding/asn1;encoding/asn1\.;' \
	  'allocation and GC;runtime\.(mallocgc|gcBgMarkWorker)$$;' \
	  'gRPC, HTTP/2, TLS outside the handler;(grpc|x/net/http2|crypto/tls)\.;ca\.\(\*Server\)\.CreateCertificate') \
	  | tee -a $(PROFILE_DIR)/breakdown.txt

## screenshot: deploy/screenshot/*.png, the dashboard's key queries on Prometheus's console while
## bin/loadgen runs (needs Debian's prometheus and chromium); not part of `make test`
.PHONY: screenshot
screenshot: build $(HELM)
	cd e2e && $(GO) build -o $(BIN)/loadgen ./loadgen
	HELM=$(HELM) deploy/screenshot/run.sh

clean:
	rm -rf $(BIN)
