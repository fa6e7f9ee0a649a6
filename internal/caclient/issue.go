package caclient

import (
	"context"
	"crypto"
	"crypto/x509"
	"fmt"
	"math/rand/v2"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/meshlite/meshlite/internal/identity"
)

// Issue makes a fresh key and a CSR for req.ID, has s sign them and checks
// the result (see Check).
func Issue(ctx context.Context, s Signer, bundle x509bundle.Source, req Request) (*x509svid.SVID, error) {
	key, err := identity.GenerateKey()
	if err != nil {
		return nil, err
	}
	csr, err := identity.NewCSR(key, req.ID)
	if err != nil {
		return nil, err
	}
	chain, err := s.Sign(ctx, req, csr)
	if err != nil {
		return nil, err
	}
	return Check(chain, bundle, req.ID, key)
}

// Check accepts a chain (leaf first) the CA returned for id only if it
// verifies against the mesh roots in bundle, its leaf is for id, and it
// certifies key's public half. It fails closed: a CA that answers for
// another identity or key is refused.
func Check(chain []*x509.Certificate, bundle x509bundle.Source, id spiffeid.ID, key crypto.Signer) (*x509svid.SVID, error) {
	got, _, err := x509svid.Verify(chain, bundle)
	if err != nil {
		return nil, fmt.Errorf("certificate for %s from the CA does not verify against the mesh root: %w", id, err)
	}
	if got != id {
		return nil, fmt.Errorf("CA issued a certificate for %s when %s was asked for", got, id)
	}
	pub, ok := chain[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(key.Public()) {
		return nil, fmt.Errorf("certificate for %s from the CA is not for the key we sent", id)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: key}, nil
}

// RenewAfter is how long after now a certificate expiring at notAfter is
// renewed: half its remaining lifetime less up to a tenth of it (jitter,
// so certificates issued together do not renew together), at least
// minWait (so a CA handing out very short lifetimes cannot make us spin).
func RenewAfter(now, notAfter time.Time, minWait time.Duration) time.Duration {
	left := notAfter.Sub(now)
	if left <= 0 {
		return minWait
	}
	d := left/2 - rand.N(left/10+1)
	return max(d, minWait)
}

// Backoff spaces the retries of a failing request: each step doubles from
// Min to Max, and the wait is drawn from the upper half of the step (full
// jitter over the second half), so that many requests failing together do
// not retry together. Min must be positive. The zero step starts at Min.
type Backoff struct {
	Min, Max time.Duration
	step     time.Duration
}

// Next returns the wait before the next retry and doubles the step.
func (b *Backoff) Next() time.Duration {
	b.step = max(b.step, b.Min)
	d := b.step/2 + rand.N(b.step/2+1)
	b.step = min(2*b.step, b.Max)
	return d
}

// Reset starts the next failure from Min again (after a success).
func (b *Backoff) Reset() { b.step = b.Min }
