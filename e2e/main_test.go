package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// Paths of the binaries under test, set once by TestMain.
var (
	castellanBin    string
	castellanctlBin string
	fakeCASBin      string // the fake Google CAS the googlecas backend talks to
	fakePCABin      string // the fake AWS Private CA the awspca backend talks to
)

// buildTimeout bounds one `go build` of a binary under test. A cold build of
// the service module takes well under a minute; this only stops a hang.
const buildTimeout = 10 * time.Minute

// TestMain builds the binaries under test once per run, unless the
// environment names prebuilt ones, and removes them afterwards.
func TestMain(m *testing.M) {
	os.Exit(run(m))
}

// run resolves the binaries, runs the tests and returns the exit code, so
// that deferred clean-up happens before os.Exit.
func run(m *testing.M) int {
	tmp, err := os.MkdirTemp("", "castellan-e2e-bin-")
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
		return 1
	}
	defer os.RemoveAll(tmp)

	for _, b := range []struct {
		dst    *string
		envVar string
		pkg    string
	}{
		{&castellanBin, "CASTELLAN_BIN", "./cmd/castellan"},
		{&castellanctlBin, "CASTELLANCTL_BIN", "./cmd/castellanctl"},
		{&fakeCASBin, "CASTELLAN_FAKECAS_BIN", "./signer/googlecas/castest/fakecas"},
		{&fakePCABin, "CASTELLAN_FAKEPCA_BIN", "./signer/awspca/pcatest/fakepca"},
	} {
		path, err := binary(b.envVar, b.pkg, tmp)
		if err != nil {
			fmt.Fprintf(os.Stderr, "e2e: %v\n", err)
			return 1
		}
		*b.dst = path
	}
	return m.Run()
}

// binary returns the absolute path of a binary under test: the file named by
// envVar when it is set, or else pkg built from the parent module into dir.
func binary(envVar, pkg, dir string) (string, error) {
	if p := os.Getenv(envVar); p != "" {
		abs, err := filepath.Abs(p)
		if err != nil {
			return "", fmt.Errorf("%s=%q: %w", envVar, p, err)
		}
		if fi, err := os.Stat(abs); err != nil {
			return "", fmt.Errorf("%s=%q: %w", envVar, p, err)
		} else if fi.IsDir() || fi.Mode()&0o111 == 0 {
			return "", fmt.Errorf("%s=%q is not an executable file", envVar, p)
		}
		return abs, nil
	}

	// The parent module is the service; build it there so that its own
	// go.mod, not this module's, decides the dependencies.
	root, err := filepath.Abs("..")
	if err != nil {
		return "", err
	}
	out := filepath.Join(dir, filepath.Base(pkg))
	ctx, cancel := context.WithTimeout(context.Background(), buildTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "GOWORK=off")
	var stderr bytes.Buffer
	cmd.Stdout = &stderr
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("building %s in %s (set %s to use a prebuilt binary): %w\n%s",
			pkg, root, envVar, err, stderr.Bytes())
	}
	return out, nil
}
