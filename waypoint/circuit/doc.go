// Package circuit owns the waypoint's protection of backends: the circuit
// breaker (a cap on in-flight upstream requests per destination Service with
// a bounded queue of pending ones) and outlier detection (ejecting endpoints
// after consecutive 5xx answers or connect failures, for a time that grows
// with each ejection, never more than a share of a Service's endpoints).
// It does no I/O; callers acquire, report outcomes and ask who is ejected.
package circuit
