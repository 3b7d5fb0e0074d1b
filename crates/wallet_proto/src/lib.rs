//! Generated types and gRPC stubs of `wallet.v1`, plus the encoded descriptor set that the
//! grpc_kafka service serves through reflection so `grpcurl` works without the proto file.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("wallet.v1");

/// The encoded `FileDescriptorSet` of wallet.proto.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("wallet_descriptor");
