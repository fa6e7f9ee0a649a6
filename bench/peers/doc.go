// Package peers sets up the tools the mesh is compared with: mTLS tunnel
// pairs (ghostunnel, stunnel4, haproxy) with certificates from a test CA,
// and HTTP proxies (nginx, haproxy) and an nginx backend for the L7 rows.
// Each runs as plain processes in the benchmark pods' network namespaces
// (package meshenv); this package writes their configuration and starts
// them. It measures nothing.
package peers
