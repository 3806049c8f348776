//! Generates the tonic/prost code for `cnishift/v1/agent.proto` (needs `protoc`:
//! Debian package `protobuf-compiler`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=cnishift/v1/agent.proto");
    tonic_prost_build::configure().compile_protos(&["cnishift/v1/agent.proto"], &["."])?;
    Ok(())
}
