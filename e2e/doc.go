// Package e2e holds Castellan's end-to-end tests. They build the real
// castellan and castellanctl binaries from the parent module (or take them
// from CASTELLAN_BIN and CASTELLANCTL_BIN), start the CA as a process on
// loopback ports, and drive it with Istio's own CA client library, exactly as
// pilot-agent on a VM does.
//
// Run them from this directory:
//
//	go test -count=1 -v ./...
//
// or with prebuilt binaries:
//
//	CASTELLAN_BIN=/abs/castellan CASTELLANCTL_BIN=/abs/castellanctl go test -count=1 ./...
//
// The package lives in its own Go module so that the service's module never
// depends on istio.io/istio. It has no non-test code besides this comment; the
// module's one command, loadgen/, is the load generator of BENCHMARKS.md.
package e2e
