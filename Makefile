# Castellan build, test and tooling. `make test` is what CI runs (.ci/run):
# it installs the pinned tools it needs through the Go toolchain, into a cache
# outside the repository, so it works on a fresh machine with only Go.

SHELL        := /bin/bash
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
	$(GO) test -run '^$$' -bench . -benchmem ./ca/ ./storage/...

clean:
	rm -rf $(BIN)
