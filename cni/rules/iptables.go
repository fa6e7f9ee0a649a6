package rules

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"time"

	"github.com/coreos/go-iptables/iptables"
)

// Tables runs iptables of one flavour (nf_tables or legacy, whichever the
// node's `iptables` is) in the network namespace of the calling thread.
type Tables struct {
	ipt     *iptables.IPTables
	restore string
	// Flavour is "nf_tables" or "legacy".
	Flavour string
}

// NewTables finds the node's iptables flavour and the matching
// iptables-restore. Both come from the same flavour, never mixed.
func NewTables() (*Tables, error) {
	out, err := exec.Command("iptables", "--version").CombinedOutput()
	if err != nil {
		return nil, fmt.Errorf("run iptables --version: %w: %s", err, bytes.TrimSpace(out))
	}
	flavour := "legacy"
	if strings.Contains(string(out), "nf_tables") {
		flavour = "nf_tables"
	}
	prefix := "iptables-legacy"
	if flavour == "nf_tables" {
		prefix = "iptables-nft"
	}
	bin, restore := prefix, prefix+"-restore"
	if _, err := exec.LookPath(bin); err != nil {
		// Older distributions ship only the plain names, in one flavour.
		bin, restore = "iptables", "iptables-restore"
	}
	restorePath, err := exec.LookPath(restore)
	if err != nil {
		return nil, fmt.Errorf("find %s: %w", restore, err)
	}
	ipt, err := iptables.New(iptables.Path(bin), iptables.Timeout(10))
	if err != nil {
		return nil, fmt.Errorf("set up %s: %w", bin, err)
	}
	return &Tables{ipt: ipt, restore: restorePath, Flavour: flavour}, nil
}

// Restore feeds input to iptables-restore --noflush: each table's changes
// apply together or not at all.
func (t *Tables) Restore(input string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, t.restore, "--noflush", "--wait", "10")
	cmd.Stdin = strings.NewReader(input)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s --noflush: %w: %s", t.restore, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return nil
}

// Exists reports whether rule r is present.
func (t *Tables) Exists(r Rule) (bool, error) {
	ok, err := t.ipt.Exists(r.Table, r.Chain, r.Args...)
	if err != nil {
		if isNoChain(err) {
			return false, nil
		}
		return false, fmt.Errorf("check %s: %w", r, err)
	}
	return ok, nil
}

// chainRules counts the rules in an owned chain (-1 when it does not exist).
func (t *Tables) chainRules(table, chain string) (int, error) {
	ok, err := t.ipt.ChainExists(table, chain)
	if err != nil {
		return 0, fmt.Errorf("look up chain %s/%s: %w", table, chain, err)
	}
	if !ok {
		return -1, nil
	}
	lines, err := t.ipt.List(table, chain)
	if err != nil {
		return 0, fmt.Errorf("list chain %s/%s: %w", table, chain, err)
	}
	n := 0
	for _, l := range lines {
		if strings.HasPrefix(l, "-A ") {
			n++
		}
	}
	return n, nil
}

// Apply makes the set present: owned chains hold exactly its rules and each
// jump exists once. It is idempotent.
func (t *Tables) Apply(s *Ruleset) error {
	missing := map[string]bool{}
	for _, j := range s.Jumps {
		ok, err := t.Exists(j)
		if err != nil {
			return err
		}
		missing[j.String()] = !ok
	}
	return t.Restore(s.Restore(func(r Rule) bool { return missing[r.String()] }))
}

// Check verifies the set: every jump and rule present, and owned chains
// hold nothing else. The error lists what is wrong.
func (t *Tables) Check(s *Ruleset) error {
	var errs []error
	for _, j := range s.Jumps {
		ok, err := t.Exists(j)
		if err != nil {
			errs = append(errs, err)
		} else if !ok {
			errs = append(errs, fmt.Errorf("missing jump %s", j))
		}
	}
	want := map[string]int{}
	for _, r := range s.Rules {
		want[r.Table+"/"+r.Chain]++
		ok, err := t.Exists(r)
		if err != nil {
			errs = append(errs, err)
		} else if !ok {
			errs = append(errs, fmt.Errorf("missing rule %s", r))
		}
	}
	for table, chains := range s.Chains {
		for _, c := range chains {
			n, err := t.chainRules(table, c)
			switch {
			case err != nil:
				errs = append(errs, err)
			case n < 0:
				errs = append(errs, fmt.Errorf("missing chain %s/%s", table, c))
			case n != want[table+"/"+c]:
				errs = append(errs, fmt.Errorf("chain %s/%s has %d rules, want %d", table, c, n, want[table+"/"+c]))
			}
		}
	}
	return errors.Join(errs...)
}

// Remove deletes the set's jumps (every copy) and its owned chains. Absent
// parts are fine.
func (t *Tables) Remove(s *Ruleset) error {
	var errs []error
	for _, j := range s.Jumps {
		for i := 0; i < 16; i++ {
			ok, err := t.Exists(j)
			if err != nil {
				errs = append(errs, err)
				break
			}
			if !ok {
				break
			}
			if err := t.ipt.Delete(j.Table, j.Chain, j.Args...); err != nil {
				errs = append(errs, fmt.Errorf("delete %s: %w", j, err))
				break
			}
		}
	}
	for table, chains := range s.Chains {
		for _, c := range chains {
			ok, err := t.ipt.ChainExists(table, c)
			if err != nil {
				errs = append(errs, fmt.Errorf("look up chain %s/%s: %w", table, c, err))
				continue
			}
			if !ok {
				continue
			}
			if err := t.ipt.ClearAndDeleteChain(table, c); err != nil {
				errs = append(errs, fmt.Errorf("delete chain %s/%s: %w", table, c, err))
			}
		}
	}
	return errors.Join(errs...)
}

// Present reports whether any part of the set (a jump or an owned chain)
// exists.
func (t *Tables) Present(s *Ruleset) (bool, error) {
	for _, j := range s.Jumps {
		ok, err := t.Exists(j)
		if err != nil || ok {
			return ok, err
		}
	}
	for table, chains := range s.Chains {
		for _, c := range chains {
			ok, err := t.ipt.ChainExists(table, c)
			if err != nil || ok {
				return ok, err
			}
		}
	}
	return false, nil
}

func isNoChain(err error) bool {
	var e *iptables.Error
	if errors.As(err, &e) {
		return e.IsNotExist()
	}
	return false
}
