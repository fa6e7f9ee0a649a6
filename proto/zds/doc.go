// Package zds is the generated Go for istio.workload.zds (zds.proto): the
// messages the CNI node agent and ztunnel exchange over the ZDS unix socket.
// Do not edit the .pb.go files; change zds.proto and run hack/proto.sh.
package zds
