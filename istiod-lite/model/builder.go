package model

// Builder computes Workload API resources from the objects in a Store.
type Builder struct {
	cfg   Config
	store *Store
}

// NewBuilder returns a Builder reading store; cfg gets Istio's defaults
// where empty.
func NewBuilder(cfg Config, store *Store) *Builder {
	return &Builder{cfg: cfg.WithDefaults(), store: store}
}

// Config is the configuration the Builder uses.
func (b *Builder) Config() Config { return b.cfg }

// Store is the object store the Builder reads.
func (b *Builder) Store() *Store { return b.store }
