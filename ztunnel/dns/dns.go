package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/meshlite/meshlite/proto/workload"
)

// TTL of the answers for mesh names, in seconds (Istio's ztunnel uses 30 as well).
const TTL = 30

// DefaultResolvConf is where the upstream resolvers are read from.
const DefaultResolvConf = "/etc/resolv.conf"

// maxForwards bounds concurrent upstream queries per Proxy; past it a
// query is answered SERVFAIL at once (a flood must not pile goroutines up).
const maxForwards = 512

// Lookup is what the proxy needs of the Workload API state (*state.Store).
type Lookup interface {
	Service(key string) *workload.Service
	Endpoints(key string) []*workload.Workload
}

// Dialer opens upstream sockets where a pod's queries must come from (its
// network namespace, marked; podnet.NS). Nil dials from ztunnel's own.
type Dialer interface {
	DialUDP(ctx context.Context, dst netip.AddrPort) (*net.UDPConn, error)
	DialTCP(ctx context.Context, src netip.Addr, dst netip.AddrPort, transparent bool) (*net.TCPConn, error)
}

// Config configures a Proxy.
type Config struct {
	State Lookup
	// DomainSuffix is the cluster's DNS domain (cluster.local).
	DomainSuffix string
	// Network is this node's network: a Service VIP on another network is
	// not answered.
	Network string
	// Upstreams are the resolvers forwarded to ("ip:port"); see
	// ReadResolvConf. None: every forward is SERVFAIL.
	Upstreams []netip.AddrPort
	// Timeout bounds one forward, all upstreams tried (2 s).
	Timeout time.Duration
	Log     *slog.Logger
}

// Proxy answers and forwards DNS queries; one serves every pod.
type Proxy struct {
	cfg    Config
	log    *slog.Logger
	suffix string // "svc.<domain>." lower case
	domain string // "<domain>." lower case
	sem    chan struct{}
	// lastWarn rate-limits the upstream failure warning (unix nanos).
	lastWarn atomic.Int64
}

// New returns a proxy.
func New(cfg Config) (*Proxy, error) {
	if cfg.State == nil {
		return nil, errors.New("dns: no state")
	}
	if cfg.DomainSuffix == "" {
		return nil, errors.New("dns: no domain suffix")
	}
	if _, ok := mdns.IsDomainName(cfg.DomainSuffix); !ok {
		return nil, fmt.Errorf("dns: domain suffix %q is not a domain name", cfg.DomainSuffix)
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 2 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	domain := strings.ToLower(mdns.Fqdn(cfg.DomainSuffix))
	return &Proxy{cfg: cfg, log: cfg.Log, domain: domain, suffix: "svc." + domain,
		sem: make(chan struct{}, maxForwards)}, nil
}

// ReadResolvConf returns the nameservers of a resolv.conf file as
// addresses (port 53 unless the file says otherwise).
func ReadResolvConf(path string) ([]netip.AddrPort, error) {
	cc, err := mdns.ClientConfigFromFile(path)
	if err != nil {
		return nil, fmt.Errorf("read upstream resolvers from %s: %w", path, err)
	}
	port := uint16(53)
	if cc.Port != "" {
		var p uint16
		if _, err := fmt.Sscan(cc.Port, &p); err == nil && p != 0 {
			port = p
		}
	}
	var out []netip.AddrPort
	for _, s := range cc.Servers {
		ip, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]"))
		if err != nil {
			continue // a scoped or malformed entry: not usable
		}
		out = append(out, netip.AddrPortFrom(ip.Unmap(), port))
	}
	return out, nil
}

// ServeUDP serves the queries arriving on pc (a pod's 15053 UDP socket),
// forwarding through d, until ctx ends. It does not close pc.
func (p *Proxy) ServeUDP(ctx context.Context, pc net.PacketConn, d Dialer) error {
	return p.serve(ctx, &mdns.Server{PacketConn: pc, Net: "udp"}, d)
}

// ServeTCP serves the queries arriving on ln (a pod's 15053 TCP listener)
// until ctx ends. It closes ln when it returns.
func (p *Proxy) ServeTCP(ctx context.Context, ln net.Listener, d Dialer) error {
	return p.serve(ctx, &mdns.Server{Listener: ln, Net: "tcp",
		ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second, IdleTimeout: func() time.Duration { return 10 * time.Second }}, d)
}

func (p *Proxy) serve(ctx context.Context, srv *mdns.Server, d Dialer) error {
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	srv.Handler = mdns.HandlerFunc(func(w mdns.ResponseWriter, req *mdns.Msg) {
		p.serveDNS(ctx, w, req, d)
	})
	done := make(chan error, 1)
	go func() { done <- srv.ActivateAndServe() }()
	select {
	case err := <-done:
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("dns: serve %s: %w", srv.Net, err)
	case <-started:
	}
	select {
	case err := <-done:
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("dns: serve %s: %w", srv.Net, err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	_ = srv.ShutdownContext(sctx)
	<-done
	return nil
}

func (p *Proxy) serveDNS(ctx context.Context, w mdns.ResponseWriter, req *mdns.Msg, d Dialer) {
	tcp := false
	if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
		tcp = true
	}
	resp := p.Answer(ctx, req, tcp, d)
	if resp == nil {
		return
	}
	if err := w.WriteMsg(resp); err != nil {
		p.log.Debug("dns: write answer", "client", w.RemoteAddr().String(), "error", err)
	}
}

// Answer is the request path: it answers req from the mesh state, or
// forwards it upstream through d, and returns the response to send (nil:
// send nothing). tcp says the query came over TCP (no size limit).
func (p *Proxy) Answer(ctx context.Context, req *mdns.Msg, tcp bool, d Dialer) *mdns.Msg {
	if req == nil || req.Response {
		return nil // never answer an answer: a reflection loop
	}
	if req.Opcode != mdns.OpcodeQuery {
		return reply(req, mdns.RcodeNotImplemented)
	}
	if len(req.Question) != 1 {
		return reply(req, mdns.RcodeFormatError)
	}
	q := req.Question[0]
	if _, ok := mdns.IsDomainName(q.Name); !ok {
		return reply(req, mdns.RcodeFormatError)
	}
	if q.Qclass == mdns.ClassINET && (q.Qtype == mdns.TypeA || q.Qtype == mdns.TypeAAAA) {
		if resp := p.local(req, q, tcp); resp != nil {
			return resp
		}
	}
	return p.forward(ctx, req, tcp, d)
}

// local answers a query for a mesh name, or returns nil to forward it.
func (p *Proxy) local(req *mdns.Msg, q mdns.Question, tcp bool) *mdns.Msg {
	name := strings.ToLower(mdns.Fqdn(q.Name))
	if !mdns.IsSubDomain(p.domain, name) {
		return nil
	}
	if impossible(name, p.domain, p.suffix) {
		resp := reply(req, mdns.RcodeNameError)
		resp.Authoritative = true
		resp.Ns = []mdns.RR{p.soa()}
		return resp
	}
	if !mdns.IsSubDomain(p.suffix, name) {
		return nil
	}
	labels := mdns.SplitDomainName(strings.TrimSuffix(name, "."+p.suffix))
	if len(labels) != 2 {
		return nil // pod hostnames of headless services, etc.: upstream knows
	}
	key := labels[1] + "/" + strings.TrimSuffix(name, ".")
	svc := p.cfg.State.Service(key)
	if svc == nil {
		return nil
	}
	ips := p.serviceIPs(svc, key)
	resp := reply(req, mdns.RcodeSuccess)
	resp.Authoritative = true
	for _, ip := range ips {
		hdr := mdns.RR_Header{Name: q.Name, Class: mdns.ClassINET, Ttl: TTL}
		switch {
		case q.Qtype == mdns.TypeA && ip.Is4():
			hdr.Rrtype = mdns.TypeA
			resp.Answer = append(resp.Answer, &mdns.A{Hdr: hdr, A: ip.AsSlice()})
		case q.Qtype == mdns.TypeAAAA && ip.Is6():
			hdr.Rrtype = mdns.TypeAAAA
			resp.Answer = append(resp.Answer, &mdns.AAAA{Hdr: hdr, AAAA: ip.AsSlice()})
		}
	}
	if len(resp.Answer) == 0 {
		resp.Ns = []mdns.RR{p.soa()} // NODATA: the name exists, not this type
	}
	if !tcp {
		size := mdns.MinMsgSize
		if o := req.IsEdns0(); o != nil {
			size = max(int(o.UDPSize()), mdns.MinMsgSize)
			resp.SetEdns0(uint16(min(size, 4096)), false)
		}
		resp.Truncate(size)
	}
	return resp
}

// impossible reports whether name, inside domain, is one no Kubernetes DNS
// holds: a search suffix appended to a name that already ended with the
// domain ("a.b.svc.cluster.local.b.svc.cluster.local"), or more than three
// labels before svc.<domain> (<svc>.<ns>, and <host>.<svc>.<ns> for
// headless pods, are all there is).
func impossible(name, domain, suffix string) bool {
	rest := strings.TrimSuffix(name, "."+domain)
	if rest == name {
		return false // the domain itself
	}
	if mdns.IsSubDomain(domain, rest+".") {
		return true
	}
	if mdns.IsSubDomain(suffix, name) && name != suffix {
		labels := mdns.SplitDomainName(strings.TrimSuffix(name, "."+suffix))
		// _port._proto.<svc>.<ns> (SRV names) are real; leave them upstream.
		return len(labels) > 3 && !strings.HasPrefix(labels[0], "_")
	}
	return false
}

// serviceIPs are the addresses a Service name resolves to on this network:
// its VIPs, or for a headless Service its healthy endpoints' IPs.
func (p *Proxy) serviceIPs(svc *workload.Service, key string) []netip.Addr {
	var out []netip.Addr
	for _, a := range svc.GetAddresses() {
		if a.GetNetwork() != "" && a.GetNetwork() != p.cfg.Network {
			continue
		}
		if ip, ok := netip.AddrFromSlice(a.GetAddress()); ok {
			out = append(out, ip.Unmap())
		}
	}
	if len(svc.GetAddresses()) > 0 {
		return out
	}
	for _, w := range p.cfg.State.Endpoints(key) {
		if w.GetStatus() != workload.WorkloadStatus_HEALTHY {
			continue
		}
		if w.GetNetwork() != "" && w.GetNetwork() != p.cfg.Network {
			continue
		}
		for _, b := range w.GetAddresses() {
			if ip, ok := netip.AddrFromSlice(b); ok {
				out = append(out, ip.Unmap())
			}
		}
	}
	return out
}

func (p *Proxy) soa() mdns.RR {
	return &mdns.SOA{Hdr: mdns.RR_Header{Name: p.domain, Rrtype: mdns.TypeSOA, Class: mdns.ClassINET, Ttl: TTL},
		Ns: "ns.dns." + p.domain, Mbox: "hostmaster." + p.domain, Serial: 1, Refresh: 7200, Retry: 1800,
		Expire: 86400, Minttl: TTL}
}

func reply(req *mdns.Msg, rcode int) *mdns.Msg {
	resp := new(mdns.Msg)
	resp.SetRcode(req, rcode)
	resp.RecursionAvailable = true
	return resp
}

// forward asks the upstreams in order within the proxy's timeout; any
// failure is SERVFAIL, so the pod's resolver moves on instead of waiting.
func (p *Proxy) forward(ctx context.Context, req *mdns.Msg, tcp bool, d Dialer) *mdns.Msg {
	if len(p.cfg.Upstreams) == 0 {
		p.warn("dns: no upstream resolver; answering SERVFAIL", nil, req)
		return reply(req, mdns.RcodeServerFailure)
	}
	select {
	case p.sem <- struct{}{}:
		defer func() { <-p.sem }()
	default:
		p.warn("dns: too many queries in flight upstream; answering SERVFAIL", nil, req)
		return reply(req, mdns.RcodeServerFailure)
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancel()
	var errs []error
	for i, up := range p.cfg.Upstreams {
		// Each upstream gets an equal share of what is left.
		left := time.Until(deadline(ctx))
		actx, acancel := context.WithTimeout(ctx, left/time.Duration(len(p.cfg.Upstreams)-i))
		resp, err := exchange(actx, req, up, tcp, d)
		acancel()
		if err == nil {
			return resp
		}
		errs = append(errs, fmt.Errorf("%s: %w", up, err))
		if ctx.Err() != nil {
			break
		}
	}
	p.warn("dns: upstream resolvers failed; answering SERVFAIL", errors.Join(errs...), req)
	return reply(req, mdns.RcodeServerFailure)
}

func deadline(ctx context.Context) time.Time {
	d, _ := ctx.Deadline()
	return d
}

// warn logs at Warn at most every 10 s (a resolver outage must not flood
// the log), at Debug otherwise.
func (p *Proxy) warn(msg string, err error, req *mdns.Msg) {
	attrs := []any{"name", req.Question[0].Name, "type", mdns.TypeToString[req.Question[0].Qtype]}
	if err != nil {
		attrs = append(attrs, "error", err)
	}
	now := time.Now().UnixNano()
	last := p.lastWarn.Load()
	if now-last > int64(10*time.Second) && p.lastWarn.CompareAndSwap(last, now) {
		p.log.Warn(msg, attrs...)
		return
	}
	p.log.Debug(msg, attrs...)
}

var forwardBufs = sync.Pool{New: func() any { b := make([]byte, mdns.MaxMsgSize); return &b }}

// exchange sends req to up and returns the matching answer.
func exchange(ctx context.Context, req *mdns.Msg, up netip.AddrPort, tcp bool, d Dialer) (*mdns.Msg, error) {
	out, err := req.Pack()
	if err != nil {
		return nil, fmt.Errorf("pack query: %w", err)
	}
	var c net.Conn
	if tcp {
		if d != nil {
			c, err = d.DialTCP(ctx, netip.Addr{}, up, false)
		} else {
			var nd net.Dialer
			c, err = nd.DialContext(ctx, "tcp", up.String())
		}
	} else {
		if d != nil {
			c, err = d.DialUDP(ctx, up)
		} else {
			var nd net.Dialer
			c, err = nd.DialContext(ctx, "udp", up.String())
		}
	}
	if err != nil {
		return nil, err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	if tcp {
		dc := &mdns.Conn{Conn: c}
		if err := dc.WriteMsg(req); err != nil {
			return nil, fmt.Errorf("send query: %w", err)
		}
		resp, err := dc.ReadMsg()
		if err != nil {
			return nil, fmt.Errorf("read answer: %w", err)
		}
		if resp.Id != req.Id {
			return nil, errors.New("answer with another id")
		}
		return resp, nil
	}
	if _, err := c.Write(out); err != nil {
		return nil, fmt.Errorf("send query: %w", err)
	}
	bp := forwardBufs.Get().(*[]byte)
	defer forwardBufs.Put(bp)
	for {
		n, err := c.Read(*bp)
		if err != nil {
			return nil, fmt.Errorf("read answer: %w", err)
		}
		resp := new(mdns.Msg)
		if err := resp.Unpack((*bp)[:n]); err != nil || resp.Id != req.Id || !resp.Response {
			continue // garbage or a stale answer on this port: wait for ours
		}
		return resp, nil
	}
}
