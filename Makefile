# Castellan build, test and tooling. `make test` is what CI runs (.ci/run):
# it installs the pinned tools it needs through the Go toolchain, into a cache
# outside the repository, so it works on a fresh machine with only Go.

SHELL        := /bin/bash
.DEFAULT_GOAL := all
.SHELLFLAGS  := -eu -o pipefail -c
GO           ?= go
CACHE_DIR    ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/castellan
TOOLS        := $(CACHE_DIR)/tools
BIN          := $(CURDIR)/bin

BUF_VERSION                := v1.75.0
PROTOC_GEN_GO_VERSION      := v1.36.12
PROTOC_GEN_GO_GRPC_VERSION := v1.6.2
STATICCHECK_VERSION        := v0.8.2

BUF               := $(TOOLS)/buf-$(BUF_VERSION)/buf
PROTOC_GEN_GO     := $(TOOLS)/protoc-gen-go-$(PROTOC_GEN_GO_VERSION)/protoc-gen-go
PROTOC_GEN_GO_GRPC:= $(TOOLS)/protoc-gen-go-grpc-$(PROTOC_GEN_GO_GRPC_VERSION)/protoc-gen-go-grpc
STATICCHECK       := $(TOOLS)/staticcheck-$(STATICCHECK_VERSION)/staticcheck
PROTO_PATH        := $(dir $(PROTOC_GEN_GO)):$(dir $(PROTOC_GEN_GO_GRPC)):$(PATH)

FUZZTIME ?= 10s
RUN_ARGS ?=

# Real components the tests run against (PostgreSQL, kube-apiserver + etcd,
# OpenBao, ...): each block below adds the target that builds or finds it to
# TEST_DEPS and the variable that tells the tests where it is to TEST_ENV.
# Blocks must stay above the `unit` and `e2e` rules: prerequisites expand when read.
TEST_DEPS :=
TEST_ENV  :=

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

# kube-apiserver + etcd for the Kubernetes e2e tests (authn/kube, node
# authorizer, root ConfigMaps), built from their Go modules by the wrapper
# modules in e2e/tools/kube and e2e/tools/etcd (see ../shared/recipes/kube.md)
# and cached per version outside the repository: the cold build takes ~10 min.
KUBE_VERSION := v1.32.13
ETCD_VERSION := v3.5.21
KUBE_BIN_DIR := $(CACHE_DIR)/kube-$(KUBE_VERSION)-etcd-$(ETCD_VERSION)
KUBE_LDFLAGS := -X k8s.io/component-base/version.gitVersion=$(KUBE_VERSION) \
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=32
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

# --- end of real components ---

.PHONY: all run build test lint vet fmt-check staticcheck proto proto-check tools unit fuzz e2e bench clean

all: build

## run: the CA on its embedded defaults (self-signed root, SQLite audit log, per-user data dir)
run:
	$(GO) run ./cmd/castellan serve $(RUN_ARGS)

## build: both binaries into ./bin
build:
	$(GO) build -o $(BIN)/ ./cmd/castellan ./cmd/castellanctl

## test: everything CI checks
test: lint proto-check unit fuzz e2e

tools: $(BUF) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC) $(STATICCHECK)

$(BUF):
	GOBIN=$(dir $@) $(GO) install github.com/bufbuild/buf/cmd/buf@$(BUF_VERSION)
$(PROTOC_GEN_GO):
	GOBIN=$(dir $@) $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(PROTOC_GEN_GO_VERSION)
$(PROTOC_GEN_GO_GRPC):
	GOBIN=$(dir $@) $(GO) install google.golang.org/grpc/cmd/protoc-gen-go-grpc@$(PROTOC_GEN_GO_GRPC_VERSION)
$(STATICCHECK):
	GOBIN=$(dir $@) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)

## proto: regenerate the committed Go code from proto/
proto: $(BUF) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
	PATH=$(PROTO_PATH) $(BUF) generate

## proto-check: fail when the committed generated code is stale, or the protos break lint
proto-check: $(BUF) $(PROTOC_GEN_GO) $(PROTOC_GEN_GO_GRPC)
	$(BUF) lint
	tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	PATH=$(PROTO_PATH) $(BUF) generate -o "$$tmp"; \
	if ! diff -r -x '*.proto' "$$tmp/proto" proto; then \
	  echo "generated code in proto/ is stale: run 'make proto' and commit" >&2; exit 1; fi

lint: fmt-check vet staticcheck

fmt-check:
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$out" ]; then echo "gofmt needed:" >&2; echo "$$out" >&2; exit 1; fi

vet:
	$(GO) vet ./...
	cd e2e && $(GO) vet ./...

staticcheck: $(STATICCHECK)
	$(STATICCHECK) ./...
	cd e2e && $(STATICCHECK) ./...

## unit: the service module's tests, with the race detector
unit: $(TEST_DEPS)
	$(TEST_ENV) $(GO) test -race -count=1 -timeout 30m ./...

## fuzz: every fuzz target, briefly (FUZZTIME each), seeded by its corpus
fuzz:
	for pkg in $$($(GO) list ./...); do \
	  for f in $$($(GO) test -list '^Fuzz' "$$pkg" | grep '^Fuzz' || true); do \
	    echo "fuzz $$pkg $$f"; \
	    $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) "$$pkg"; \
	  done; \
	done

## e2e: the real binaries driven by Istio's real CA client (separate module under e2e/)
e2e: build $(TEST_DEPS)
	cd e2e && $(TEST_ENV) CASTELLAN_BIN=$(BIN)/castellan CASTELLANCTL_BIN=$(BIN)/castellanctl $(GO) test -count=1 -timeout 30m ./...

## bench: issuance pipeline benchmarks (numbers go to BENCHMARKS.md)
bench:
	$(GO) test -run '^$$' -bench . -benchmem ./ca/ ./storage/... ./signer/cakey/

## loadgen: 32 mTLS clients against the real binary (embedded audit), then Istio's own CA
## with the same client; not part of `make test`. Numbers and method: BENCHMARKS.md.
LOADGEN_ARGS ?= -clients 32 -duration 30s
.PHONY: loadgen
loadgen: build
	cd e2e && $(GO) build -o $(BIN)/loadgen ./loadgen
	$(BIN)/loadgen -mode castellan -castellan-bin $(BIN)/castellan $(LOADGEN_ARGS)
	$(BIN)/loadgen -mode istio $(LOADGEN_ARGS)

clean:
	rm -rf $(BIN)
