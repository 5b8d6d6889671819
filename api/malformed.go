package api

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	protov2 "google.golang.org/protobuf/proto"
)

// ReasonMalformedRequest: the request's bytes are not a valid protobuf
// encoding of its message (invalid UTF-8 in a string, a truncated body, a
// bad wire type). Final: the same bytes will never decode.
const ReasonMalformedRequest = "MALFORMED_REQUEST"

// Malformed requests. grpc-go decodes a request before any interceptor runs
// (the generated unary handler calls dec first; rpc_util.go recv wraps a
// codec error as codes.Internal "grpc: failed to unmarshal the received
// message"), so an interceptor never sees the failure and the caller gets
// INTERNAL with no ErrorInfo. Instead the server uses tolerantCodec: when
// protobuf decoding fails it leaves the message empty but for a marker
// (an unknown field), and never fails; malformedUnary and malformedStream
// turn a marked message into INVALID_ARGUMENT MALFORMED_REQUEST before any
// handler sees it. The marker is an unknown field, so nothing but these
// interceptors looks at it; a caller that sends the marker itself only gets
// its own request refused.

// malformedField is the marker's field number: the largest protobuf allows
// (no Tally message uses it).
const malformedField = protowire.MaxValidNumber

var malformedMarker = protowire.AppendBytes(protowire.AppendTag(nil, malformedField, protowire.BytesType), []byte("tally: malformed request"))

// tolerantCodec wraps the server's proto codec (base).
type tolerantCodec struct{ base encoding.CodecV2 }

func (c tolerantCodec) Marshal(v any) (mem.BufferSlice, error) { return c.base.Marshal(v) }
func (c tolerantCodec) Name() string                           { return c.base.Name() }

func (c tolerantCodec) Unmarshal(data mem.BufferSlice, v any) error {
	err := c.base.Unmarshal(data, v)
	if err == nil {
		return nil
	}
	m, ok := v.(protov2.Message)
	if !ok {
		return err
	}
	protov2.Reset(m)
	m.ProtoReflect().SetUnknown(malformedMarker)
	return nil
}

// malformed reports whether v was marked by tolerantCodec.
func malformed(v any) bool {
	m, ok := v.(protov2.Message)
	if !ok {
		return false
	}
	u := m.ProtoReflect().GetUnknown()
	return len(u) >= len(malformedMarker) && string(u[:len(malformedMarker)]) == string(malformedMarker)
}

func errMalformed() error {
	return newStatus(codes.InvalidArgument, ReasonMalformedRequest,
		"the request is not a valid protobuf encoding of its message (invalid UTF-8 in a string field, or truncated): fix the client; resending the same bytes cannot succeed", nil)
}

func malformedUnary() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		if malformed(req) {
			return nil, errMalformed()
		}
		return h(ctx, req)
	}
}

type malformedCheckStream struct{ grpc.ServerStream }

func (s malformedCheckStream) RecvMsg(m any) error {
	if err := s.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	if malformed(m) {
		return errMalformed()
	}
	return nil
}

func malformedStream() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		return h(srv, malformedCheckStream{ss})
	}
}
