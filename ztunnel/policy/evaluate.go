package policy

import (
	"context"
	"log/slog"

	"github.com/meshlite/meshlite/proto/security"
)

// Reasons a Decision gives.
const (
	ReasonDenyMatched     = "matched a DENY policy"
	ReasonAllowMatched    = "matched an ALLOW policy"
	ReasonNoAllowMatched  = "no ALLOW policy matched"
	ReasonNoAllowPolicies = "no ALLOW policy applies"
	ReasonMissingPolicy   = "a policy listed for the workload has not been received"
)

// Decision is the outcome of Evaluate.
type Decision struct {
	Allow bool
	// Policy is the deciding policy's key ("<ns>/<name>"); empty when no
	// single policy decided (no ALLOW policies, none matched).
	Policy string
	// Rule is the index of the matching rule (group) of Policy, -1 if none.
	Rule   int
	Reason string
}

// Evaluate decides c against the policies that apply to the destination
// workload. missing lists keys of policies the workload lists but that were
// not received; any such key denies (fail closed, unlike Istio, which skips
// them). Dry-run policies are evaluated and logged at Info, never enforced.
func Evaluate(log *slog.Logger, c *Conn, pols []*Policy, missing []string) Decision {
	if len(missing) > 0 {
		return Decision{Policy: missing[0], Rule: -1, Reason: ReasonMissingPolicy}
	}
	// Dry-run first so that their verdict is logged whatever the outcome.
	dryAllow, dryAllowMatched := false, false
	for _, p := range pols {
		if !p.DryRun {
			continue
		}
		rule, ok := p.Match(c)
		if p.Action == security.Action_ALLOW {
			dryAllow = true
			dryAllowMatched = dryAllowMatched || ok
		}
		if ok && log != nil {
			log.LogAttrs(context.Background(), slog.LevelInfo, "dry-run policy matched",
				slog.String("policy", p.Key), slog.Int("rule", rule), slog.String("action", p.Action.String()),
				slog.String("src.identity", c.identity()), slog.String("src.ip", c.Src.String()),
				slog.String("dst", c.Dst.String()))
		}
	}
	for _, p := range pols {
		if p.DryRun || p.Action != security.Action_DENY {
			continue
		}
		if rule, ok := p.Match(c); ok {
			return Decision{Policy: p.Key, Rule: rule, Reason: ReasonDenyMatched}
		}
	}
	anyAllow := false
	for _, p := range pols {
		if p.DryRun || p.Action != security.Action_ALLOW {
			continue
		}
		anyAllow = true
		if rule, ok := p.Match(c); ok {
			return Decision{Allow: true, Policy: p.Key, Rule: rule, Reason: ReasonAllowMatched}
		}
	}
	if !anyAllow {
		if dryAllow && !dryAllowMatched && log != nil {
			log.LogAttrs(context.Background(), slog.LevelInfo, "dry-run: no ALLOW policy would match",
				slog.String("src.identity", c.identity()), slog.String("src.ip", c.Src.String()),
				slog.String("dst", c.Dst.String()))
		}
		return Decision{Allow: true, Rule: -1, Reason: ReasonNoAllowPolicies}
	}
	return Decision{Rule: -1, Reason: ReasonNoAllowMatched}
}

// Log writes the decision: a denial at Info with source identity, source IP,
// destination (workload name and address), policy and rule; an allow at
// Debug.
func Log(log *slog.Logger, c *Conn, dstWorkload string, d Decision) {
	lvl := slog.LevelDebug
	msg := "connection allowed"
	if !d.Allow {
		lvl, msg = slog.LevelInfo, "connection denied by policy"
	}
	if !log.Enabled(context.Background(), lvl) {
		return
	}
	log.LogAttrs(context.Background(), lvl, msg,
		slog.String("src.identity", c.identity()), slog.String("src.ip", c.Src.String()),
		slog.String("dst.workload", dstWorkload), slog.String("dst", c.Dst.String()),
		slog.String("policy", d.Policy), slog.Int("rule", d.Rule), slog.String("reason", d.Reason))
}

// identity is the peer's SPIFFE ID as every ztunnel log line writes it
// (with the spiffe:// scheme; Principal, the form policies match, has
// none), or "none".
func (c *Conn) identity() string {
	if c.Principal == "" {
		return "none"
	}
	return "spiffe://" + c.Principal
}
