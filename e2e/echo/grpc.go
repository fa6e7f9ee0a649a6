package echo

import (
	"context"
	"strconv"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The gRPC echo service has one unary method that takes and returns a
// google.protobuf.StringValue, so it needs no generated code of its own:
//
//	service meshlite.echo.v1.Echo { rpc Echo(StringValue) returns (StringValue); }
//
// The answer is the same "Key=value" text as over HTTP, with Message= the
// request's value and Proto=GRPC.
const (
	echoService = "meshlite.echo.v1.Echo"
	echoMethod  = "/" + echoService + "/Echo"
)

type echoHandler interface {
	echo(ctx context.Context, in *wrapperspb.StringValue) (*wrapperspb.StringValue, error)
}

func registerEcho(g *grpc.Server, h echoHandler) {
	g.RegisterService(&grpc.ServiceDesc{
		ServiceName: echoService,
		HandlerType: (*echoHandler)(nil),
		Methods: []grpc.MethodDesc{{
			MethodName: "Echo",
			Handler: func(srv any, ctx context.Context, dec func(any) error, icpt grpc.UnaryServerInterceptor) (any, error) {
				in := new(wrapperspb.StringValue)
				if err := dec(in); err != nil {
					return nil, err
				}
				call := func(ctx context.Context, req any) (any, error) {
					return srv.(echoHandler).echo(ctx, req.(*wrapperspb.StringValue))
				}
				if icpt == nil {
					return call(ctx, in)
				}
				return icpt(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: echoMethod}, call)
			},
		}},
		Metadata: "meshlite/echo.proto",
	}, h)
}

func (s *Server) echo(ctx context.Context, in *wrapperspb.StringValue) (*wrapperspb.StringValue, error) {
	var f fieldWriter
	port := 0
	if p, ok := peer.FromContext(ctx); ok && p.LocalAddr != nil {
		if _, ps, err := splitHostPort(p.LocalAddr.String()); err == nil {
			port, _ = strconv.Atoi(ps)
		}
	}
	f.identity(s.cfg.Identity, port)
	f.add(FieldProtocol, "GRPC")
	f.add(FieldMethod, echoMethod)
	if p, ok := peer.FromContext(ctx); ok {
		f.add(FieldPeer, p.Addr.String())
	}
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		f.headers(md)
	}
	f.add(FieldMessage, in.GetValue())
	return wrapperspb.String(f.String()), nil
}

// callEcho sends one Echo call.
func callEcho(ctx context.Context, conn *grpc.ClientConn, msg string, opts ...grpc.CallOption) (string, error) {
	out := new(wrapperspb.StringValue)
	if err := conn.Invoke(ctx, echoMethod, wrapperspb.String(msg), out, opts...); err != nil {
		return "", err
	}
	return out.GetValue(), nil
}
