package authn

import (
	"context"
	"testing"

	"google.golang.org/grpc/metadata"
	authenticationv1 "k8s.io/api/authentication/v1"
)

func TestCallerFrom_ReadsOnlyAuthenticatedServiceAccounts(t *testing.T) {
	a := New(nil)
	ok := func(user string, extra map[string]authenticationv1.ExtraValue, aud ...string) *authenticationv1.TokenReview {
		if len(aud) == 0 {
			aud = []string{"istio-ca"}
		}
		return &authenticationv1.TokenReview{Status: authenticationv1.TokenReviewStatus{
			Authenticated: true, Audiences: aud, User: authenticationv1.UserInfo{Username: user, Extra: extra}}}
	}
	c, err := a.callerFrom(ok("system:serviceaccount:istio-system:ztunnel", map[string]authenticationv1.ExtraValue{
		"authentication.kubernetes.io/pod-name":  {"ztunnel-x"},
		"authentication.kubernetes.io/pod-uid":   {"u1"},
		"authentication.kubernetes.io/node-name": {"node-a"},
	}))
	if err != nil || c.Namespace != "istio-system" || c.ServiceAccount != "ztunnel" || c.PodName != "ztunnel-x" || c.PodUID != "u1" || c.NodeName != "node-a" {
		t.Fatalf("caller %+v, err %v", c, err)
	}
	for name, tr := range map[string]*authenticationv1.TokenReview{
		"not authenticated": {Status: authenticationv1.TokenReviewStatus{User: authenticationv1.UserInfo{Username: "system:serviceaccount:a:b"}}},
		"review error":      {Status: authenticationv1.TokenReviewStatus{Authenticated: true, Error: "boom"}},
		"a user":            ok("alice", nil),
		"a node":            ok("system:node:node-a", nil),
		"empty sa":          ok("system:serviceaccount:a:", nil),
		"other audience":    ok("system:serviceaccount:a:b", nil, "other"),
	} {
		if c, err := a.callerFrom(tr); err == nil {
			t.Errorf("%s: accepted as %+v", name, c)
		}
	}
}

func TestBearerToken(t *testing.T) {
	for hdr, want := range map[string]string{
		"Bearer abc":  "abc",
		"bearer  abc": "abc",
		"Basic abc":   "",
		"Bearer":      "",
		"":            "",
	} {
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", hdr))
		got, err := BearerToken(ctx)
		if got != want || (want == "" && err == nil) {
			t.Errorf("%q: token %q err %v, want %q", hdr, got, err, want)
		}
	}
}
