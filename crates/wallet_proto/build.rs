//! Compiles proto/wallet/v1/wallet.proto (protoc from PROTOC or PATH) and writes the descriptor set
//! that the reflection service serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let proto = proto_root.join("wallet/v1/wallet.proto");
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("wallet_descriptor.bin"))
        .compile_protos(&[proto], &[proto_root])?;
    Ok(())
}
