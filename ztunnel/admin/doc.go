// Package admin serves ztunnel's node-level HTTP endpoints: the admin
// interface on localhost:15000 (/config_dump, /debug/connections,
// /debug/pprof/, /logging), Prometheus metrics on 15020 (/metrics and
// /stats/prometheus) and readiness on 15021 (/healthz/ready).
//
// It owns the JSON shape of the config dump and nothing else: what it shows
// comes from the functions it is given, and it changes no state except the
// log level.
package admin
