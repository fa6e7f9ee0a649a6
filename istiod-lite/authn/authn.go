// Package authn authenticates gRPC callers of istiod-lite (xDS and CA) by
// their Kubernetes service-account token: the Bearer token of the call's
// "authorization" metadata is checked with a TokenReview for the expected
// audience, and the caller's namespace, service account and, for pod-bound
// tokens, pod and node are returned. It decides nothing about what a caller
// may do.
package authn

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	authenticationv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlite/meshlite/internal/kube"
)

// Caller is an authenticated service account.
type Caller struct {
	Namespace      string
	ServiceAccount string
	// Set when the token is bound to a pod.
	PodName, PodUID, NodeName string
}

func (c *Caller) String() string { return c.Namespace + "/" + c.ServiceAccount }

// Authenticator checks service-account tokens with TokenReview.
type Authenticator struct {
	client    kubernetes.Interface
	audiences []string
	timeout   time.Duration
	now       func() time.Time

	mu    sync.Mutex
	cache map[[32]byte]cached
}

type cached struct {
	caller  *Caller
	expires time.Time
}

// cacheTTL bounds how long a reviewed token is trusted without asking the
// apiserver again (a deleted pod's token stops working within it).
const cacheTTL = 30 * time.Second

// New returns an Authenticator accepting tokens for any of audiences
// (istio-ca when none is given).
func New(client kubernetes.Interface, audiences ...string) *Authenticator {
	if len(audiences) == 0 {
		audiences = []string{kube.TokenAudience}
	}
	return &Authenticator{client: client, audiences: audiences, timeout: 10 * time.Second, now: time.Now, cache: map[[32]byte]cached{}}
}

// ErrNoToken says the call carried no Bearer token.
var ErrNoToken = errors.New("no bearer token in the authorization metadata")

// BearerToken extracts the Bearer token of an incoming gRPC call.
func BearerToken(ctx context.Context) (string, error) {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return "", ErrNoToken
	}
	for _, v := range md.Get("authorization") {
		scheme, tok, found := strings.Cut(strings.TrimSpace(v), " ")
		if found && strings.EqualFold(scheme, "bearer") && strings.TrimSpace(tok) != "" {
			return strings.TrimSpace(tok), nil
		}
	}
	return "", ErrNoToken
}

// Authenticate authenticates the caller of an incoming gRPC call. Errors are
// gRPC status errors: Unauthenticated for missing or rejected tokens,
// Unavailable when the apiserver could not be asked.
func (a *Authenticator) Authenticate(ctx context.Context) (*Caller, error) {
	tok, err := BearerToken(ctx)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	return a.Review(ctx, tok)
}

// Review checks one token.
func (a *Authenticator) Review(ctx context.Context, token string) (*Caller, error) {
	key := sha256.Sum256([]byte(token))
	now := a.now()
	a.mu.Lock()
	if c, ok := a.cache[key]; ok && now.Before(c.expires) {
		a.mu.Unlock()
		return c.caller, nil
	}
	a.mu.Unlock()

	ctx, cancel := context.WithTimeout(ctx, a.timeout)
	defer cancel()
	tr, err := a.client.AuthenticationV1().TokenReviews().Create(ctx, &authenticationv1.TokenReview{
		Spec: authenticationv1.TokenReviewSpec{Token: token, Audiences: a.audiences},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "token review: %v", err)
	}
	caller, err := a.callerFrom(tr)
	if err != nil {
		return nil, status.Error(codes.Unauthenticated, err.Error())
	}
	a.mu.Lock()
	if len(a.cache) > 10000 {
		for k, c := range a.cache {
			if !now.Before(c.expires) {
				delete(a.cache, k)
			}
		}
	}
	a.cache[key] = cached{caller: caller, expires: now.Add(cacheTTL)}
	a.mu.Unlock()
	return caller, nil
}

func (a *Authenticator) callerFrom(tr *authenticationv1.TokenReview) (*Caller, error) {
	st := tr.Status
	if st.Error != "" {
		return nil, fmt.Errorf("token rejected: %s", st.Error)
	}
	if !st.Authenticated {
		return nil, errors.New("token rejected: not authenticated")
	}
	if !intersects(st.Audiences, a.audiences) {
		return nil, fmt.Errorf("token audiences %v are not %v", st.Audiences, a.audiences)
	}
	// system:serviceaccount:<namespace>:<name>
	parts := strings.Split(st.User.Username, ":")
	if len(parts) != 4 || parts[0] != "system" || parts[1] != "serviceaccount" || parts[2] == "" || parts[3] == "" {
		return nil, fmt.Errorf("token of %q is not a service account's", st.User.Username)
	}
	c := &Caller{Namespace: parts[2], ServiceAccount: parts[3]}
	c.PodName = first(st.User.Extra[kube.ExtraPodName])
	c.PodUID = first(st.User.Extra[kube.ExtraPodUID])
	c.NodeName = first(st.User.Extra[kube.ExtraNodeName])
	return c, nil
}

func first(v authenticationv1.ExtraValue) string {
	if len(v) == 0 {
		return ""
	}
	return v[0]
}

func intersects(a, b []string) bool {
	for _, x := range a {
		for _, y := range b {
			if x == y {
				return true
			}
		}
	}
	return false
}
