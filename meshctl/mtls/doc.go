// Package mtls computes meshctl's mTLS verdict: one row per pod joining what
// is configured (enrollment labels, PeerAuthentications), what is enforced
// (the mode and the redirection each node's ztunnel reports, its
// certificates) and what is observed (the live connections in the
// ztunnels' tables, by security), and a summary that fails when an enrolled
// pod talks plaintext or lacks redirection or a certificate.
//
// It is pure logic over the gathered inputs: it does no I/O, so its
// verdicts are tested on fixtures.
package mtls
