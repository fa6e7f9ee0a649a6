package xds

import (
	"encoding/hex"
	"fmt"
	"hash/fnv"
	"sort"
	"sync"
	"time"

	discovery "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	ixds "github.com/meshlite/meshlite/internal/xds"
)

// Resource is one named xDS resource, marshalled once for every client.
type Resource struct {
	Name string
	// Version is a digest of Body: equal versions mean equal content.
	Version string
	// Aliases are other names a client may look the resource up by
	// ("network/IP" for Address resources).
	Aliases []string
	// MemberOf names the resources this one belongs to: a Workload lists the
	// Services it backs, so an on-demand client that asked for a Service
	// also gets its workloads.
	MemberOf []string
	// Scope, when set, limits who receives the resource to the clients of
	// that scope (a waypoint's L7 configuration goes only to the waypoint
	// of that Gateway, "<ns>/<name>"); empty: every client.
	Scope string
	Body  *anypb.Any
	// wire is the resource as it appears in a response: field
	// DeltaDiscoveryResponse.resources with its discovery.Resource, encoded
	// once here and copied verbatim into every response that carries it.
	wire []byte
}

// NewResource marshals msg deterministically under typeURL.
func NewResource(typeURL, name string, msg proto.Message, aliases, memberOf []string) (*Resource, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(msg)
	if err != nil {
		return nil, fmt.Errorf("marshal %s %s: %w", typeURL, name, err)
	}
	h := fnv.New64a()
	h.Write(b)
	r := &Resource{
		Name:     name,
		Version:  hex.EncodeToString(h.Sum(nil)),
		Aliases:  aliases,
		MemberOf: memberOf,
		Body:     &anypb.Any{TypeUrl: typeURL, Value: b},
	}
	wr, err := proto.MarshalOptions{Deterministic: true}.Marshal(&discovery.Resource{Name: r.Name, Version: r.Version, Aliases: r.Aliases, Resource: r.Body})
	if err != nil {
		return nil, fmt.Errorf("marshal %s %s: %w", typeURL, name, err)
	}
	r.wire = protowire.AppendBytes(protowire.AppendTag(make([]byte, 0, len(wr)+8), fieldResources, protowire.BytesType), wr)
	return r, nil
}

// Cache holds the current resources of every type the server serves and the
// names that changed since the server last looked. Safe for concurrent use.
type Cache struct {
	mu     sync.RWMutex
	tables map[string]*table
	seq    uint64

	// Changes not yet taken by the server.
	pending      map[string]map[string]struct{}
	pendingSince time.Time
	notify       chan struct{}

	readyOnce sync.Once
	ready     chan struct{}
}

type table struct {
	// sorted is every resource by name, rebuilt after a change; clients
	// connecting together share one, and the snapshot of it, built on first
	// use.
	sorted  []*Resource
	snap    *snapshot
	byName  map[string]*Resource
	byAlias map[string]string
	members map[string]map[string]struct{}
	// scoped counts the resources with a Scope: a table without any keeps
	// the shared full-push path.
	scoped int
}

// NewCache returns an empty cache serving the given type URLs (the
// Workload API's two when none are given).
func NewCache(typeURLs ...string) *Cache {
	if len(typeURLs) == 0 {
		typeURLs = []string{ixds.TypeAddress, ixds.TypeAuthorization}
	}
	c := &Cache{
		tables:  map[string]*table{},
		pending: map[string]map[string]struct{}{},
		notify:  make(chan struct{}, 1),
		ready:   make(chan struct{}),
	}
	for _, t := range typeURLs {
		c.tables[t] = &table{byName: map[string]*Resource{}, byAlias: map[string]string{}, members: map[string]map[string]struct{}{}}
	}
	return c
}

// Serves reports whether typeURL is a type of this cache.
func (c *Cache) Serves(typeURL string) bool {
	_, ok := c.tables[typeURL]
	return ok
}

// Update stores set and deletes remove for typeURL; resources whose version
// did not change are ignored. It returns how many names changed.
func (c *Cache) Update(typeURL string, set []*Resource, remove []string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	t := c.tables[typeURL]
	if t == nil {
		return 0
	}
	changed := 0
	for _, r := range set {
		old := t.byName[r.Name]
		if old != nil && old.Version == r.Version && old.Scope == r.Scope && equalStrings(old.Aliases, r.Aliases) && equalStrings(old.MemberOf, r.MemberOf) {
			continue
		}
		if old != nil {
			t.unindex(old)
		}
		t.sorted, t.snap = nil, nil
		t.byName[r.Name] = r
		t.index(r)
		if old == nil || old.Version != r.Version || old.Scope != r.Scope {
			c.mark(typeURL, r.Name)
			changed++
		}
	}
	for _, n := range remove {
		old := t.byName[n]
		if old == nil {
			continue
		}
		t.unindex(old)
		t.sorted, t.snap = nil, nil
		delete(t.byName, n)
		c.mark(typeURL, n)
		changed++
	}
	return changed
}

func (c *Cache) mark(typeURL, name string) {
	m := c.pending[typeURL]
	if m == nil {
		m = map[string]struct{}{}
		c.pending[typeURL] = m
	}
	if c.pendingSince.IsZero() {
		c.pendingSince = time.Now()
	}
	m[name] = struct{}{}
	c.seq++
	select {
	case c.notify <- struct{}{}:
	default:
	}
}

func (t *table) index(r *Resource) {
	if r.Scope != "" {
		t.scoped++
	}
	for _, a := range r.Aliases {
		t.byAlias[a] = r.Name
	}
	for _, p := range r.MemberOf {
		m := t.members[p]
		if m == nil {
			m = map[string]struct{}{}
			t.members[p] = m
		}
		m[r.Name] = struct{}{}
	}
}

func (t *table) unindex(r *Resource) {
	if r.Scope != "" {
		t.scoped--
	}
	for _, a := range r.Aliases {
		if t.byAlias[a] == r.Name {
			delete(t.byAlias, a)
		}
	}
	for _, p := range r.MemberOf {
		if m := t.members[p]; m != nil {
			delete(m, r.Name)
			if len(m) == 0 {
				delete(t.members, p)
			}
		}
	}
}

// Changed is signalled (coalesced) when names changed.
func (c *Cache) Changed() <-chan struct{} { return c.notify }

// TakeChanges returns the names changed per type since the last call and
// when the oldest of those changes happened.
func (c *Cache) TakeChanges() (map[string]map[string]struct{}, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p, since := c.pending, c.pendingSince
	c.pending = map[string]map[string]struct{}{}
	c.pendingSince = time.Time{}
	if len(p) == 0 {
		return nil, time.Time{}
	}
	return p, since
}

// Get returns the resource typeURL/name or nil.
func (c *Cache) Get(typeURL, name string) *Resource {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if t := c.tables[typeURL]; t != nil {
		return t.byName[name]
	}
	return nil
}

// Resolve finds a resource by name or alias.
func (c *Cache) Resolve(typeURL, key string) *Resource {
	c.mu.RLock()
	defer c.mu.RUnlock()
	t := c.tables[typeURL]
	if t == nil {
		return nil
	}
	if r := t.byName[key]; r != nil {
		return r
	}
	if n, ok := t.byAlias[key]; ok {
		return t.byName[n]
	}
	return nil
}

// Members lists the resources that name is the parent of, sorted.
func (c *Cache) Members(typeURL, name string) []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	t := c.tables[typeURL]
	if t == nil {
		return nil
	}
	out := make([]string, 0, len(t.members[name]))
	for n := range t.members[name] {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// Names lists every resource name of typeURL, sorted.
func (c *Cache) Names(typeURL string) []string {
	c.mu.RLock()
	defer c.mu.RUnlock()
	t := c.tables[typeURL]
	if t == nil {
		return nil
	}
	out := make([]string, 0, len(t.byName))
	for n := range t.byName {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// All returns every resource of typeURL, sorted by name. The slice is
// shared and must not be modified.
func (c *Cache) All(typeURL string) []*Resource {
	c.mu.RLock()
	t := c.tables[typeURL]
	if t == nil {
		c.mu.RUnlock()
		return nil
	}
	if out := t.sorted; out != nil {
		c.mu.RUnlock()
		return out
	}
	c.mu.RUnlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	return t.sortedLocked()
}

func (t *table) sortedLocked() []*Resource {
	if t.sorted == nil {
		out := make([]*Resource, 0, len(t.byName))
		for _, r := range t.byName {
			out = append(out, r)
		}
		sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
		t.sorted = out
	}
	return t.sorted
}

// hasScoped reports whether some resource of typeURL has a Scope.
func (c *Cache) hasScoped(typeURL string) bool {
	c.mu.RLock()
	defer c.mu.RUnlock()
	t := c.tables[typeURL]
	return t != nil && t.scoped > 0
}

// snapshot is every resource of a type at one moment, prepared for the
// clients that need all of them (a fresh wildcard subscriber): shared by
// them all and never modified.
type snapshot struct {
	all []*Resource
	// body is the wire encodings of all, concatenated: the body of a full
	// response.
	body []byte
	// versions is name -> version of all: what such a client then holds,
	// cloned for it (a copy of the table, not a rebuild).
	versions map[string]string
}

// snapshot returns the current snapshot of typeURL (nil for a type not
// served).
func (c *Cache) snapshot(typeURL string) *snapshot {
	c.mu.RLock()
	t := c.tables[typeURL]
	if t == nil {
		c.mu.RUnlock()
		return nil
	}
	if s := t.snap; s != nil {
		c.mu.RUnlock()
		return s
	}
	c.mu.RUnlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if t.snap == nil {
		all := t.sortedLocked()
		s := &snapshot{all: all, body: appendWire(nil, all), versions: make(map[string]string, len(all))}
		for _, r := range all {
			s.versions[r.Name] = r.Version
		}
		t.snap = s
	}
	return t.snap
}

// Len is the number of resources of typeURL.
func (c *Cache) Len(typeURL string) int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if t := c.tables[typeURL]; t != nil {
		return len(t.byName)
	}
	return 0
}

// Version counts changes; it is the system_version_info of responses.
func (c *Cache) Version() uint64 {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.seq
}

// MarkReady says the cache holds a complete first picture of the cluster;
// the server answers no request before that.
func (c *Cache) MarkReady() { c.readyOnce.Do(func() { close(c.ready) }) }

// Ready is closed once MarkReady was called.
func (c *Cache) Ready() <-chan struct{} { return c.ready }

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
