package main

import (
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// The profiles are served only with --debug-pprof: they show the process's
// memory and code paths, so the default monitoring listener must not have them.
func TestMonitoringHandlerPprof(t *testing.T) {
	for _, tc := range []struct {
		name  string
		pprof bool
		path  string
		want  int
	}{
		{"off: index", false, "/debug/pprof/", http.StatusNotFound},
		{"off: allocs", false, "/debug/pprof/allocs", http.StatusNotFound},
		{"off: cpu", false, "/debug/pprof/profile?seconds=1", http.StatusNotFound},
		{"on: index", true, "/debug/pprof/", http.StatusOK},
		{"on: allocs", true, "/debug/pprof/allocs", http.StatusOK},
		{"on: cmdline", true, "/debug/pprof/cmdline", http.StatusOK},
		{"on: metrics still served", true, "/metrics", http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			monitoringHandler(prometheus.NewRegistry(), nil, tc.pprof).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, tc.path, nil))
			if rec.Code != tc.want {
				t.Fatalf("GET %s: status %d, want %d", tc.path, rec.Code, tc.want)
			}
			if tc.want == http.StatusOK && rec.Body.Len() == 0 {
				t.Fatalf("GET %s: empty body", tc.path)
			}
		})
	}
}
