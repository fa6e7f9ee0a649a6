package certs

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/caclient"
)

// ErrNoCertificate is wrapped by every "no usable certificate" error.
var ErrNoCertificate = errors.New("no certificate")

// Config configures a Manager.
type Config struct {
	// Signer asks the CA (a *caclient.Client); requests impersonate the
	// pod identity.
	Signer caclient.Signer
	// Bundle verifies what the CA returns (the mesh roots).
	Bundle x509bundle.Source
	// TTL is the lifetime asked for (0: the CA's default).
	TTL time.Duration
	// Retry backoff after a failed request, doubling from MinBackoff
	// (500 ms) to MaxBackoff (30 s), with jitter.
	MinBackoff, MaxBackoff time.Duration
	// MinRefresh is the shortest wait before renewing a certificate (1 s),
	// so a CA handing out very short lifetimes cannot make us spin.
	MinRefresh time.Duration
	// MaxConcurrent bounds requests in flight to the CA (8).
	MaxConcurrent int
	Log           *slog.Logger
	// Registerer, if set, gets the manager's metrics.
	Registerer prometheus.Registerer
}

// Manager holds a certificate per identity used by local pods.
type Manager struct {
	cfg  Config
	log  *slog.Logger
	sem  chan struct{}
	ctx  context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup

	mu       sync.Mutex
	stopped  bool // Run is stopping: no new renewal loops
	entries  map[spiffeid.ID]*entry
	pods     map[string]spiffeid.ID // pod uid -> identity
	requests *prometheus.CounterVec
}

// entry is one identity's certificate and its renewal loop.
type entry struct {
	id spiffeid.ID
	m  *Manager

	// Guarded by Manager.mu.
	pods map[string]struct{}
	// Guarded by mu.
	mu          sync.Mutex
	svid        *x509svid.SVID
	lastErr     error
	lastErrAt   time.Time
	nextRefresh time.Time
	attempted   chan struct{} // closed after the first attempt
	issued      chan struct{} // closed when the first certificate is held
}

// New returns a manager; Run drives renewals.
func New(cfg Config) (*Manager, error) {
	if cfg.Signer == nil || cfg.Bundle == nil {
		return nil, errors.New("certs: signer and bundle are required")
	}
	if cfg.MinBackoff <= 0 {
		cfg.MinBackoff = 500 * time.Millisecond
	}
	if cfg.MaxBackoff <= 0 {
		cfg.MaxBackoff = 30 * time.Second
	}
	if cfg.MinRefresh <= 0 {
		cfg.MinRefresh = time.Second
	}
	if cfg.MaxConcurrent <= 0 {
		cfg.MaxConcurrent = 8
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	ctx, stop := context.WithCancel(context.Background())
	m := &Manager{cfg: cfg, log: cfg.Log, sem: make(chan struct{}, cfg.MaxConcurrent), ctx: ctx, stop: stop,
		entries: map[spiffeid.ID]*entry{}, pods: map[string]spiffeid.ID{},
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlite_ztunnel_certificate_requests_total",
			Help: "Certificate requests to the CA, by result (ok or error).",
		}, []string{"result"}),
	}
	if cfg.Registerer != nil {
		held := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshlite_ztunnel_certificates_held",
			Help: "Identities for which a valid certificate is held.",
		}, func() float64 { return float64(m.held()) })
		missing := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "meshlite_ztunnel_pods_without_certificate",
			Help: "Local pods whose identity has no valid certificate.",
		}, func() float64 { return float64(len(m.missing())) })
		if err := registerAll(cfg.Registerer, m.requests, held, missing); err != nil {
			stop()
			return nil, err
		}
	}
	return m, nil
}

func registerAll(r prometheus.Registerer, cs ...prometheus.Collector) error {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			return fmt.Errorf("certs: register metrics: %w", err)
		}
	}
	return nil
}

// Run returns when ctx ends, after stopping every renewal loop. Loops start
// as identities are added, before or after Run starts.
func (m *Manager) Run(ctx context.Context) error {
	<-ctx.Done()
	// After this no loop starts, so Wait sees every wg.Add.
	m.mu.Lock()
	m.stopped = true
	m.mu.Unlock()
	m.stop()
	m.wg.Wait()
	return nil
}

// AddPod says pod uid runs locally with identity id and returns the source
// of its certificate (shared by every pod of id). Adding a uid again with
// another identity moves it.
func (m *Manager) AddPod(uid string, id spiffeid.ID) x509svid.Source {
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.pods[uid]; ok && old != id {
		m.removePodLocked(uid)
	}
	e := m.entryLocked(id)
	e.pods[uid] = struct{}{}
	m.pods[uid] = id
	return source{e}
}

// RemovePod forgets pod uid. An identity no pod uses is dropped at its next
// renewal instead of renewed.
func (m *Manager) RemovePod(uid string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.removePodLocked(uid)
}

func (m *Manager) removePodLocked(uid string) {
	id, ok := m.pods[uid]
	if !ok {
		return
	}
	delete(m.pods, uid)
	if e := m.entries[id]; e != nil {
		delete(e.pods, uid)
	}
}

// entryLocked returns id's entry, starting its loop if it is new.
func (m *Manager) entryLocked(id spiffeid.ID) *entry {
	if e := m.entries[id]; e != nil {
		return e
	}
	e := &entry{id: id, m: m, pods: map[string]struct{}{}, attempted: make(chan struct{}), issued: make(chan struct{})}
	m.entries[id] = e
	if m.stopped {
		return e // no certificate will come: the manager is stopping
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		e.run(m.ctx)
	}()
	return e
}

// Source returns the certificate source of id (it has no certificate
// until id is added or fetched).
func (m *Manager) Source(id spiffeid.ID) x509svid.Source {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e := m.entries[id]; e != nil {
		return source{e}
	}
	return missingSource(id)
}

// Fetch starts obtaining id's certificate, if not already held, and waits
// until it is held, the first attempt for it failed, or ctx ends. Without
// a pod added for id by then, the certificate is dropped at its renewal
// time.
func (m *Manager) Fetch(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	m.mu.Lock()
	e := m.entryLocked(id)
	m.mu.Unlock()
	if s, err := e.current(); err == nil {
		return s, nil
	}
	select {
	case <-e.attempted:
	case <-ctx.Done():
		return nil, fmt.Errorf("%w for %s yet: %w", ErrNoCertificate, id, ctx.Err())
	}
	return e.current()
}

// Ready is nil when every local pod's identity has a valid certificate;
// else it says which do not, and why.
func (m *Manager) Ready() error {
	miss := m.missing()
	if len(miss) == 0 {
		return nil
	}
	var b strings.Builder
	for i, err := range miss {
		if i == 3 {
			fmt.Fprintf(&b, "; and %d more", len(miss)-3)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(err.Error())
	}
	return errors.New(b.String())
}

func (m *Manager) missing() []error {
	m.mu.Lock()
	var es []*entry
	for _, e := range m.entries {
		if len(e.pods) > 0 {
			es = append(es, e)
		}
	}
	m.mu.Unlock()
	slices.SortFunc(es, func(a, b *entry) int { return strings.Compare(a.id.String(), b.id.String()) })
	var out []error
	for _, e := range es {
		if _, err := e.current(); err != nil {
			out = append(out, err)
		}
	}
	return out
}

func (m *Manager) held() int {
	m.mu.Lock()
	es := make([]*entry, 0, len(m.entries))
	for _, e := range m.entries {
		es = append(es, e)
	}
	m.mu.Unlock()
	n := 0
	for _, e := range es {
		if _, err := e.current(); err == nil {
			n++
		}
	}
	return n
}

// Status is what the manager holds for one identity (for config dumps).
type Status struct {
	Identity string   `json:"identity"`
	Pods     []string `json:"pods"`
	// State is "valid", "pending" (no certificate yet) or "expired".
	State       string    `json:"state"`
	Serial      string    `json:"serial,omitempty"`
	NotBefore   time.Time `json:"not_before,omitzero"`
	NotAfter    time.Time `json:"not_after,omitzero"`
	NextRefresh time.Time `json:"next_refresh,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
}

// Statuses lists every identity held, sorted.
func (m *Manager) Statuses() []Status {
	m.mu.Lock()
	type pair struct {
		e    *entry
		pods []string
	}
	var ps []pair
	for _, e := range m.entries {
		pods := make([]string, 0, len(e.pods))
		for uid := range e.pods {
			pods = append(pods, uid)
		}
		slices.Sort(pods)
		ps = append(ps, pair{e, pods})
	}
	m.mu.Unlock()
	out := make([]Status, 0, len(ps))
	now := time.Now()
	for _, p := range ps {
		e := p.e
		st := Status{Identity: e.id.String(), Pods: p.pods, State: "pending"}
		e.mu.Lock()
		if s := e.svid; s != nil {
			leaf := s.Certificates[0]
			st.Serial = leaf.SerialNumber.Text(16)
			st.NotBefore, st.NotAfter = leaf.NotBefore, leaf.NotAfter
			st.State = "valid"
			if now.After(leaf.NotAfter) {
				st.State = "expired"
			}
		}
		st.NextRefresh = e.nextRefresh
		if e.lastErr != nil {
			st.LastError, st.LastErrorAt = e.lastErr.Error(), e.lastErrAt
		}
		e.mu.Unlock()
		out = append(out, st)
	}
	slices.SortFunc(out, func(a, b Status) int { return strings.Compare(a.Identity, b.Identity) })
	return out
}

// current returns the certificate if it is valid now.
func (e *entry) current() (*x509svid.SVID, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.svid == nil {
		if e.lastErr != nil {
			return nil, fmt.Errorf("%w for %s: %w", ErrNoCertificate, e.id, e.lastErr)
		}
		return nil, fmt.Errorf("%w for %s yet: request pending", ErrNoCertificate, e.id)
	}
	if exp := e.svid.Certificates[0].NotAfter; time.Now().After(exp) {
		why := "renewal pending"
		if e.lastErr != nil {
			why = "renewal failing: " + e.lastErr.Error()
		}
		return nil, fmt.Errorf("%w for %s: certificate expired at %s (%s)", ErrNoCertificate, e.id, exp.Format(time.RFC3339), why)
	}
	return e.svid, nil
}

// run obtains and renews e's certificate until ctx ends or no pod uses
// the identity any more when a renewal is due.
func (e *entry) run(ctx context.Context) {
	m := e.m
	log := m.log.With("identity", e.id.String())
	backoff := caclient.Backoff{Min: m.cfg.MinBackoff, Max: m.cfg.MaxBackoff}
	first := true
	for {
		svid, err := m.fetch(ctx, e.id)
		if ctx.Err() != nil {
			return
		}
		var wait time.Duration
		now := time.Now()
		e.mu.Lock()
		if err != nil {
			m.requests.WithLabelValues("error").Inc()
			e.lastErr, e.lastErrAt = err, now
			wait = backoff.Next()
			if e.svid != nil {
				log.Warn("certificate renewal failed; still serving the current certificate",
					"error", err, "expires", e.svid.Certificates[0].NotAfter, "retry_in", wait)
			} else {
				log.Warn("certificate request failed", "error", err, "retry_in", wait)
			}
		} else {
			m.requests.WithLabelValues("ok").Inc()
			if e.svid == nil {
				close(e.issued)
			}
			e.svid, e.lastErr = svid, nil
			backoff.Reset()
			wait = caclient.RenewAfter(now, svid.Certificates[0].NotAfter, m.cfg.MinRefresh)
			log.Info("certificate issued", "serial", svid.Certificates[0].SerialNumber.Text(16),
				"expires", svid.Certificates[0].NotAfter, "renew_in", wait.Round(time.Millisecond))
		}
		e.nextRefresh = now.Add(wait)
		e.mu.Unlock()
		if first {
			close(e.attempted)
			first = false
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		m.mu.Lock()
		if len(e.pods) == 0 {
			delete(m.entries, e.id)
			m.mu.Unlock()
			log.Info("identity no longer used by a local pod; certificate dropped")
			return
		}
		m.mu.Unlock()
	}
}

// fetch has the CA issue a certificate for id on behalf of its pods,
// checked against the mesh roots (caclient.Issue).
func (m *Manager) fetch(ctx context.Context, id spiffeid.ID) (*x509svid.SVID, error) {
	select {
	case m.sem <- struct{}{}:
		defer func() { <-m.sem }()
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return caclient.Issue(ctx, m.cfg.Signer, m.cfg.Bundle, caclient.Request{ID: id, Impersonate: true, TTL: m.cfg.TTL})
}

// source is an x509svid.Source for one identity.
type source struct{ e *entry }

func (s source) GetX509SVID() (*x509svid.SVID, error) { return s.e.current() }

// WaitX509SVID is GetX509SVID, waiting until ctx ends for a first
// certificate that is still on its way.
func (s source) WaitX509SVID(ctx context.Context) (*x509svid.SVID, error) {
	if svid, err := s.e.current(); err == nil {
		return svid, nil
	}
	select {
	case <-s.e.issued:
	case <-ctx.Done():
	}
	return s.e.current()
}

type missingSource spiffeid.ID

func (s missingSource) GetX509SVID() (*x509svid.SVID, error) {
	return nil, fmt.Errorf("%w for %s: identity not requested", ErrNoCertificate, spiffeid.ID(s))
}
