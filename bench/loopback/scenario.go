// Package loopback is the first `make bench` scenario: single-stream
// throughput on loopback of plain TCP, one TLS 1.3 connection, and our HBONE
// tunnel over HTTP/2 and over QUIC, all in one run so the ratios compare like
// with like.
package loopback

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/pprof"
	"sort"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/bench/report"
	"github.com/meshlite/meshlite/internal/identity"
)

// Options sets how long and how often each row is measured.
type Options struct {
	Duration time.Duration
	Rounds   int
	Log      *slog.Logger
	// ProfileDir, when set, gets a CPU profile of each row's last round
	// (<dir>/<scenario>-<row>.pprof), for finding where the time goes.
	ProfileDir string
}

// Name is the scenario's name for `make bench SCENARIO=...`.
const Name = "hbone-loopback"

// Scenario returns the scenario for the bench runner.
func Scenario(o Options) report.Scenario {
	return report.Scenario{Name: Name, Run: func(ctx context.Context) (report.Result, error) { return run(ctx, o) }}
}

type row struct {
	name string
	dial dialFunc
}

// env is what every row shares: a sink on loopback and a mesh identity pair.
type env struct {
	log      *slog.Logger
	sinkAddr string
	ca       *identity.Authority
	client   *x509svid.SVID
	server   *x509svid.SVID
	serverIP netip.Addr
	closers  []func()
}

func (e *env) close() {
	for i := len(e.closers) - 1; i >= 0; i-- {
		e.closers[i]()
	}
}

func newEnv(log *slog.Logger) (*env, error) {
	e := &env{log: log, serverIP: netip.MustParseAddr("127.0.0.1")}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listen sink: %w", err)
	}
	s := newSink(ln, log)
	e.closers = append(e.closers, s.Close)
	e.sinkAddr = ln.Addr().String()

	td := spiffeid.RequireTrustDomainFromString(identity.DefaultTrustDomain)
	if e.ca, err = identity.NewAuthority(td, 24*time.Hour); err != nil {
		e.close()
		return nil, err
	}
	for _, p := range []struct {
		sa  string
		out **x509svid.SVID
	}{{"client", &e.client}, {"server", &e.server}} {
		id, err := identity.NewID(identity.DefaultTrustDomain, "bench", p.sa)
		if err == nil {
			*p.out, err = e.ca.NewSVID(id, time.Hour)
		}
		if err != nil {
			e.close()
			return nil, fmt.Errorf("identity %s: %w", p.sa, err)
		}
	}
	return e, nil
}

// tlsConfigs returns the mesh's client and server TLS configs for the pair.
func (e *env) tlsConfigs() (client, server *tls.Config, err error) {
	client, err = identity.ClientConfig(e.client, e.ca.Bundle(), identity.AuthorizeID(e.server.ID))
	if err != nil {
		return nil, nil, err
	}
	server, err = identity.ServerConfig(identity.StaticCertificates(map[netip.Addr]*x509svid.SVID{e.serverIP: e.server}),
		e.ca.Bundle(), identity.AuthorizeMemberOf(e.ca.TrustDomain()))
	return client, server, err
}

func tcpRow(e *env) (row, error) {
	return row{name: "plain TCP", dial: func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", e.sinkAddr)
	}}, nil
}

// tlsRow terminates TLS 1.3 (the mesh's own configs) in front of a sink.
func tlsRow(e *env) (row, error) {
	cc, sc, err := e.tlsConfigs()
	if err != nil {
		return row{}, err
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", sc)
	if err != nil {
		return row{}, fmt.Errorf("listen tls: %w", err)
	}
	s := newSink(ln, e.log)
	e.closers = append(e.closers, s.Close)
	addr := ln.Addr().String()
	return row{name: "TLS 1.3 (one connection)", dial: func(ctx context.Context) (net.Conn, error) {
		d := tls.Dialer{Config: cc}
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return nil, err
		}
		return c, nil
	}}, nil
}

func run(ctx context.Context, o Options) (report.Result, error) {
	e, err := newEnv(o.Log)
	if err != nil {
		return report.Result{}, err
	}
	defer e.close()
	var rows []row
	for _, mk := range []func(*env) (row, error){tcpRow, tlsRow, hboneH2Row, hboneQUICRow} {
		r, err := mk(e)
		if err != nil {
			return report.Result{}, err
		}
		rows = append(rows, r)
	}
	// Rounds interleave the rows so drift on the machine hits all of them alike.
	samples := make([][]float64, len(rows))
	for round := 0; round < o.Rounds; round++ {
		for i, r := range rows {
			stopProfile, err := startProfile(o.ProfileDir, r.name, round == o.Rounds-1)
			if err != nil {
				return report.Result{}, err
			}
			mctx, cancel := context.WithTimeout(ctx, o.Duration+30*time.Second)
			g, err := measure(mctx, r.dial, o.Duration)
			cancel()
			stopProfile()
			if err != nil {
				return report.Result{}, fmt.Errorf("%s: %w", r.name, err)
			}
			o.Log.Info("measured", "row", r.name, "round", round+1, "gbps", fmt.Sprintf("%.2f", g))
			samples[i] = append(samples[i], g)
		}
	}
	med := make([]float64, len(rows))
	for i := range rows {
		med[i] = median(samples[i])
	}
	res := report.Result{
		Scenario: Name,
		Description: "Single-stream throughput on loopback, one process: a sender writes 64 KiB buffers for " +
			o.Duration.String() + ", half-closes, and the sink answers with the byte count it received. " +
			"HBONE rows go client -> tunnel (mTLS, SPIFFE identities on both ends) -> server -> TCP to the sink, " +
			"as ztunnel's inbound does; the TLS row terminates at the sink with no second hop.",
		Columns: []string{"path", "Gbit/s (median)", "all rounds", "x plain TCP", "x TLS 1.3"},
		Values:  map[string]map[string]float64{},
	}
	report.Describe(&res)
	for i, r := range rows {
		var all string
		for j, s := range samples[i] {
			if j > 0 {
				all += ", "
			}
			all += fmt.Sprintf("%.2f", s)
		}
		res.Rows = append(res.Rows, []string{r.name, fmt.Sprintf("%.2f", med[i]), all,
			fmt.Sprintf("%.2f", med[i]/med[0]), fmt.Sprintf("%.2f", med[i]/med[1])})
		res.Values[r.name] = map[string]float64{"gbps": med[i], "ratio_tcp": med[i] / med[0], "ratio_tls": med[i] / med[1]}
	}
	h2 := med[2] / med[1]
	verdict := "met"
	if h2 < 0.6 {
		verdict = "missed"
	}
	res.Notes = append(res.Notes, fmt.Sprintf("Goal: HBONE/h2 at least 0.6 x one TLS connection: %.2f x, %s.", h2, verdict))
	return res, nil
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// startProfile starts a CPU profile for a row when asked to; the returned
// func stops it.
func startProfile(dir, rowName string, last bool) (func(), error) {
	if dir == "" || !last {
		return func() {}, nil
	}
	name := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' {
			return r
		}
		return '-'
	}, rowName)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	path := filepath.Join(dir, Name+"-"+name+".pprof")
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}
