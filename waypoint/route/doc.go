// Package route owns Gateway API route semantics for the waypoint: it
// compiles the HTTPRoutes and GRPCRoutes of a ServiceConfig into a table
// ordered by Gateway API match precedence, matches requests against it, and
// computes what filters do to a request (header modifiers, URL rewrite,
// redirect location). It is pure: no I/O, no clocks, no randomness beyond
// what a caller passes in, and it never sends anything.
package route
