package identity

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultTrustDomain is the trust domain used when none is configured, as in Istio.
const DefaultTrustDomain = "cluster.local"

// Identity is the Kubernetes workload identity a SPIFFE ID encodes.
type Identity struct {
	TrustDomain    spiffeid.TrustDomain
	Namespace      string
	ServiceAccount string
}

// NewID builds spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>.
func NewID(trustDomain, namespace, serviceAccount string) (spiffeid.ID, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("build SPIFFE ID: trust domain %q: %w", trustDomain, err)
	}
	return Identity{TrustDomain: td, Namespace: namespace, ServiceAccount: serviceAccount}.ID()
}

// ID returns the SPIFFE ID of i, or an error if a part is empty or holds
// characters a SPIFFE path segment may not.
func (i Identity) ID() (spiffeid.ID, error) {
	if i.TrustDomain.IsZero() {
		return spiffeid.ID{}, errors.New("build SPIFFE ID: empty trust domain")
	}
	if i.Namespace == "" {
		return spiffeid.ID{}, errors.New("build SPIFFE ID: empty namespace")
	}
	if i.ServiceAccount == "" {
		return spiffeid.ID{}, errors.New("build SPIFFE ID: empty service account")
	}
	id, err := spiffeid.FromSegments(i.TrustDomain, "ns", i.Namespace, "sa", i.ServiceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("build SPIFFE ID for %s/%s: %w", i.Namespace, i.ServiceAccount, err)
	}
	return id, nil
}

// String returns the SPIFFE ID as a string, or "" if i is not a valid identity.
func (i Identity) String() string {
	id, err := i.ID()
	if err != nil {
		return ""
	}
	return id.String()
}

// ParseID parses a SPIFFE ID string of the form
// spiffe://<td>/ns/<namespace>/sa/<service-account>.
func ParseID(s string) (Identity, error) {
	id, err := spiffeid.FromString(s)
	if err != nil {
		return Identity{}, fmt.Errorf("parse SPIFFE ID %q: %w", s, err)
	}
	return FromID(id)
}

// FromID splits a SPIFFE ID into its Kubernetes identity. IDs whose path is not
// exactly /ns/<namespace>/sa/<service-account> are rejected.
func FromID(id spiffeid.ID) (Identity, error) {
	if id.IsZero() {
		return Identity{}, errors.New("parse SPIFFE ID: empty ID")
	}
	parts := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" || parts[1] == "" || parts[3] == "" {
		return Identity{}, fmt.Errorf("parse SPIFFE ID %q: path must be /ns/<namespace>/sa/<service-account>", id)
	}
	return Identity{TrustDomain: id.TrustDomain(), Namespace: parts[1], ServiceAccount: parts[3]}, nil
}
