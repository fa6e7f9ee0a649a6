package meshenv

import (
	"context"
	"log/slog"
	"sync"
)

// Shared opens the Env on first use and lets every scenario of one bench
// run use the same one (the mesh is installed once); Close tears it down.
type Shared struct {
	Log *slog.Logger
	mu  sync.Mutex
	env *Env
	err error
}

// Get returns the Env, opening it (and installing the mesh with h2) on the
// first call.
func (s *Shared) Get(ctx context.Context) (*Env, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.env == nil && s.err == nil {
		s.env, s.err = Open(ctx, s.Log)
		if s.err == nil {
			if err := s.env.Mesh(ctx, TunnelH2); err != nil {
				s.err = err
				s.env.Close()
				s.env = nil
			}
		}
	}
	return s.env, s.err
}

// Close closes the Env if one was opened.
func (s *Shared) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.env == nil {
		return nil
	}
	err := s.env.Close()
	s.env = nil
	return err
}
