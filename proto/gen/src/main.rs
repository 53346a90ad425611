//! Writes `proto/src/gen/prefixd.v1.rs` with a vendored protoc. Run from anywhere:
//! `cargo run --manifest-path proto/gen/Cargo.toml`.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = proto_dir.join("src").join("gen");
    std::fs::create_dir_all(&out)?;
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .out_dir(&out)
        .build_transport(false) // the rpc named Connect would clash with the generated `connect` constructor
        .compile_protos(&[proto_dir.join("prefixd.proto")], &[proto_dir])?;
    println!("wrote {}", out.join("prefixd.v1.rs").display());
    Ok(())
}
