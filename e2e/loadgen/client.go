package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"sync"
	"time"

	pb "istio.io/api/security/v1alpha1"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
)

// credential is one client's workload identity and mTLS certificate.
type credential struct {
	id   string // spiffe://…/ns/loadgen/sa/client-N
	cert tls.Certificate
}

// workloadID is the identity of client i in trust domain td.
func workloadID(td string, i int) string {
	return fmt.Sprintf("spiffe://%s/ns/loadgen/sa/client-%d", td, i)
}

// client is one simulated workload: its own connection, its own credential
// and CSRs for its own identity, made before the clock starts.
type client struct {
	id    string
	conn  *grpc.ClientConn
	api   pb.IstioCertificateServiceClient
	csrs  []string
	keys  []crypto.PublicKey // keys[i] is certified by csrs[i]
	roots *x509.CertPool
}

// newClients connects one client per credential and waits until every
// connection is ready, so that handshakes are not part of the measurement.
func newClients(ctx context.Context, t *target, o options) ([]*client, error) {
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(t.bundlePEM)) {
		return nil, errors.New("target trust bundle holds no certificate")
	}
	clients := make([]*client, 0, len(t.creds))
	for _, cr := range t.creds {
		c := &client{id: cr.id, roots: roots}
		for range o.csrs {
			csr, pub, err := newCSR(cr.id)
			if err != nil {
				closeClients(clients)
				return nil, err
			}
			c.csrs, c.keys = append(c.csrs, csr), append(c.keys, pub)
		}
		conn, err := grpc.NewClient(t.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
			MinVersion:   tls.VersionTLS12,
			RootCAs:      roots,
			ServerName:   t.serverName,
			Certificates: []tls.Certificate{cr.cert},
		})))
		if err != nil {
			closeClients(clients)
			return nil, fmt.Errorf("client %s: %w", cr.id, err)
		}
		c.conn, c.api = conn, pb.NewIstioCertificateServiceClient(conn)
		clients = append(clients, c)
	}
	for _, c := range clients {
		if err := waitReady(ctx, c.conn); err != nil {
			closeClients(clients)
			return nil, fmt.Errorf("client %s: connect to %s: %w", c.id, t.addr, err)
		}
	}
	return clients, nil
}

func waitReady(ctx context.Context, conn *grpc.ClientConn) error {
	conn.Connect()
	for {
		s := conn.GetState()
		if s == connectivity.Ready {
			return nil
		}
		if !conn.WaitForStateChange(ctx, s) {
			return fmt.Errorf("connection %v: %w", s, ctx.Err())
		}
	}
}

func closeClients(clients []*client) {
	for _, c := range clients {
		_ = c.conn.Close() // fails only on a second close
	}
}

// newCSR makes a ztunnel-style CSR: fresh P-256 key, empty subject, one URI SAN.
func newCSR(id string) (string, crypto.PublicKey, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", nil, err
	}
	u, err := url.Parse(id)
	if err != nil {
		return "", nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		return "", nil, err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), key.Public(), nil
}

// call sends CSR n once and checks the answer's shape: at least two elements,
// each a PEM certificate. With full, it also parses the leaf and checks that
// it certifies the CSR's key for the client's identity and chains to the
// bundle (done once per client, so the client's CPU stays off the server's).
func (c *client) call(ctx context.Context, n int, ttl time.Duration, timeout time.Duration, full bool) error {
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, "clusterid", "Kubernetes"), timeout)
	defer cancel()
	i := n % len(c.csrs)
	resp, err := c.api.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: c.csrs[i], ValidityDuration: int64(ttl / time.Second)})
	if err != nil {
		return err
	}
	chain := resp.GetCertChain()
	if len(chain) < 2 {
		return fmt.Errorf("%w: %d elements, want at least 2", errBadResponse, len(chain))
	}
	for _, e := range chain {
		if !strings.HasPrefix(strings.TrimSpace(e), "-----BEGIN CERTIFICATE-----") {
			return fmt.Errorf("%w: element is not a PEM certificate", errBadResponse)
		}
	}
	if !full {
		return nil
	}
	return c.checkLeaf(chain, c.keys[i])
}

var errBadResponse = errors.New("bad response")

func (c *client) checkLeaf(chain []string, pub crypto.PublicKey) error {
	block, _ := pem.Decode([]byte(chain[0]))
	if block == nil {
		return fmt.Errorf("%w: leaf is not PEM", errBadResponse)
	}
	leaf, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return fmt.Errorf("%w: leaf: %w", errBadResponse, err)
	}
	inter := x509.NewCertPool()
	for _, e := range chain[1 : len(chain)-1] {
		inter.AppendCertsFromPEM([]byte(e))
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(chain[len(chain)-1])) {
		return fmt.Errorf("%w: last element holds no root", errBadResponse)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("%w: leaf does not verify: %w", errBadResponse, err)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: c.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return fmt.Errorf("%w: leaf does not chain to the bundle the server was dialled with: %w", errBadResponse, err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != c.id {
		return fmt.Errorf("%w: leaf URI SANs %v, want [%s]", errBadResponse, leaf.URIs, c.id)
	}
	if k, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !k.Equal(pub) {
		return fmt.Errorf("%w: leaf does not certify the CSR's key", errBadResponse)
	}
	return nil
}

// drive runs warm-up then the measured phase and returns what was measured.
func drive(ctx context.Context, clients []*client, t *target, o options, out io.Writer) (*result, error) {
	// One fully checked call per client first: a wrong answer stops the run.
	for _, c := range clients {
		if err := c.call(ctx, 0, o.ttl, o.timeout, true); err != nil {
			return nil, fmt.Errorf("first request of %s: %w", c.id, err)
		}
	}
	rec := newRecorder()
	var tickets *ticketCounter
	if o.requests > 0 {
		tickets = newTicketCounter(o.requests)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for _, c := range clients {
		wg.Go(func() { c.loop(ctx, rec, tickets, stop, o) })
	}
	allDone := make(chan struct{})
	go func() { wg.Wait(); close(allDone) }()

	if o.warmup > 0 {
		select {
		case <-time.After(o.warmup):
		case <-ctx.Done():
		}
	}
	cpuStart, _ := readCPU(t.pid)
	storeStart, _ := t.readStoreCPU()
	selfStart, _ := readSelfCPU()
	loadStart := loadAverage()
	start := rec.start()
	mem := newMemorySeries(t.pid)
	mem.sample(start)

	var deadline <-chan time.Time
	if o.duration > 0 {
		timer := time.NewTimer(o.duration)
		defer timer.Stop()
		deadline = timer.C
	}
	var tick <-chan time.Time
	if o.report > 0 {
		ticker := time.NewTicker(o.report)
		defer ticker.Stop()
		tick = ticker.C
	}
	prev := rec.snapshot()
	prevAt := start
wait:
	for {
		select {
		case <-deadline:
			break wait
		case <-allDone: // -requests used up
			break wait
		case <-ctx.Done():
			break wait
		case now := <-tick:
			cur := rec.snapshot()
			m := mem.sample(now)
			fmt.Fprintf(out, "%s\n", intervalLine(now.Sub(start), prev, cur, now.Sub(prevAt), m))
			prev, prevAt = cur, now
		}
	}
	end := rec.stop()
	close(stop)
	<-allDone
	cpuEnd, _ := readCPU(t.pid)
	storeEnd, _ := t.readStoreCPU()
	selfEnd, _ := readSelfCPU()
	mem.sample(time.Now())
	res := &result{
		elapsed:   end.Sub(start),
		hist:      rec.snapshot(),
		codes:     rec.codeCounts(),
		memory:    mem,
		serverCPU: cpuEnd - cpuStart,
		storeCPU:  storeEnd - storeStart,
		clientCPU: selfEnd - selfStart,
		load:      [2]string{loadStart, loadAverage()},
	}
	if ctx.Err() != nil {
		return res, fmt.Errorf("interrupted: %w", ctx.Err())
	}
	return res, nil
}

// loop sends requests until stop (or the tickets run out), recording each
// outcome once the measured phase has started.
func (c *client) loop(ctx context.Context, rec *recorder, tickets *ticketCounter, stop <-chan struct{}, o options) {
	for n := 1; ; n++ {
		select {
		case <-stop:
			return
		case <-ctx.Done():
			return
		default:
		}
		measured := rec.measuring()
		if measured && tickets != nil && !tickets.take() {
			return
		}
		t0 := time.Now()
		err := c.call(ctx, n, o.ttl, o.timeout, false)
		if measured {
			rec.observe(time.Since(t0), err) // dropped if the phase ended meanwhile
		}
	}
}
