package caclient

import (
	"crypto/x509"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/meshlite/meshlite/internal/identity"
)

var (
	fuzzTD = spiffeid.RequireTrustDomainFromString("cluster.local")
	fuzzID = spiffeid.RequireFromString("spiffe://cluster.local/ns/default/sa/sleep")
)

// FuzzParseChain: whatever a CA answers, parseChain returns certificates
// or an error, never a panic or an empty chain, and Check accepts nothing
// that is not for the identity asked.
func FuzzParseChain(f *testing.F) {
	ca, _ := identity.NewAuthority(fuzzTD, time.Hour)
	svid, _ := ca.NewSVID(fuzzID, time.Hour)
	key, _ := identity.GenerateKey()
	leaf := string(identity.EncodeCertsPEM(svid.Certificates))
	root := string(identity.EncodeCertsPEM([]*x509.Certificate{ca.Root()}))
	f.Add(leaf, root)
	f.Add(leaf+root, "")
	f.Add("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "")
	f.Add("", "")
	f.Fuzz(func(t *testing.T, a, b string) {
		chain, err := parseChain([]string{a, b})
		if err != nil {
			return
		}
		if len(chain) == 0 {
			t.Fatal("empty chain without error")
		}
		// The key is not the one certified: Check must refuse.
		if s, err := Check(chain, ca.Bundle(), fuzzID, key); err == nil {
			t.Fatalf("accepted a chain for another key: %v", s.ID)
		}
	})
}

func TestParseChain_DropsRootKeepsLeafFirst(t *testing.T) {
	ca, _ := identity.NewAuthority(fuzzTD, time.Hour)
	svid, _ := ca.NewSVID(fuzzID, time.Hour)
	leaf := string(identity.EncodeCertsPEM(svid.Certificates))
	root := string(identity.EncodeCertsPEM([]*x509.Certificate{ca.Root()}))
	chain, err := parseChain([]string{leaf, root})
	if err != nil || len(chain) != 1 || !chain[0].Equal(svid.Certificates[0]) {
		t.Fatalf("chain %v, %v", chain, err)
	}
	// A lone self-signed certificate is not dropped (nothing would be left).
	if chain, err := parseChain([]string{root}); err != nil || len(chain) != 1 {
		t.Errorf("root alone: %v, %v", chain, err)
	}
	if _, err := parseChain(nil); err == nil || !strings.Contains(err.Error(), "no certificate") {
		t.Errorf("empty response: %v", err)
	}
	if _, err := parseChain([]string{leaf, "junk"}); err == nil || !strings.Contains(err.Error(), "certificate 1") {
		t.Errorf("junk: %v", err)
	}
	// What parseChain returns is what Check verifies.
	if s, err := Check(chain, ca.Bundle(), fuzzID, svid.PrivateKey); err != nil || s.ID != fuzzID {
		t.Errorf("Check(parsed chain) = %v, %v", s, err)
	}
}
