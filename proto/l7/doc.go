// Package l7 is the generated Go for meshlite.l7 (l7.proto): the waypoint's L7
// configuration, one ServiceConfig per Service bound to a waypoint, served by
// istiod-lite over Delta ADS as type.googleapis.com/meshlite.l7.ServiceConfig.
// l7.proto documents how a waypoint identifies itself on its Delta request.
// Do not edit the .pb.go files; change l7.proto and run hack/proto.sh.
package l7
