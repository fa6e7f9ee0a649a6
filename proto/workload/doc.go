// Package workload is the generated Go for istio.workload (workload.proto):
// the Workload API resources istiod-lite serves over Delta ADS as
// type.googleapis.com/istio.workload.Address. Do not edit the .pb.go files;
// change workload.proto and run hack/proto.sh.
package workload
