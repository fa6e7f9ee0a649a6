// Package measure reads what the benchmark tools print (iperf3 and fortio
// JSON, wrk's summary) and what /proc says about a process's CPU time and
// memory, into plain figures. It only parses: it starts no process.
package measure
