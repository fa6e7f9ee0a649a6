// Package echo is the sandbox's sample app (bin/echo): a server that echoes
// what it receives over HTTP/1.1 and h2c (one port), gRPC, and raw TCP,
// reporting who served it (pod, namespace, IP from the downward-API env) and
// the peer address it saw; and a client that sends N requests to such a
// server and says whether they all worked. Demos and e2e tests use it so
// they need nothing from outside.
//
// HTTP and gRPC answers are text, one "Key=value" a line (see Field*), so
// people can read them and tests can parse them with ParseFields.
package echo
