package sandbox

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"time"
)

// State is what a sandbox records about itself in <state dir>/state.json.
type State struct {
	Nodes  int    `json:"nodes"`
	Prefix string `json:"prefix"`
	// Instance picks the addresses and names (netlab.PlanFor).
	Instance int `json:"instance,omitempty"`
	// Ready is set once `up` finished; a state that is not Ready is a
	// failed or interrupted `up`.
	Ready bool `json:"ready"`
	// Persistent sandboxes are never torn down by tests.
	Persistent bool      `json:"persistent"`
	StartedAt  time.Time `json:"startedAt"`
	UpSeconds  float64   `json:"upSeconds,omitempty"`
	RepoRoot   string    `json:"repoRoot"`
	KubeBinDir string    `json:"kubeBinDir"`
	KubeletBin string    `json:"kubeletBin"`
	// MadeNetnsMount says the sandbox bind-mounted /run/netns.
	MadeNetnsMount bool `json:"madeNetnsMount"`
}

func statePath(dir string) string { return filepath.Join(dir, "state.json") }

func loadState(dir string) (*State, error) {
	b, err := os.ReadFile(statePath(dir))
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("parse %s: %w", statePath(dir), err)
	}
	return &s, nil
}

func saveState(dir string, s *State) error {
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("encode state: %w", err)
	}
	tmp := statePath(dir) + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	if err := os.Rename(tmp, statePath(dir)); err != nil {
		return fmt.Errorf("write state: %w", err)
	}
	return nil
}
