//! Generates the tonic/prost code for `cnishift/v1/agent.proto`.
//!
//! The `.proto` file is parsed by `protox`, a protobuf compiler written in
//! Rust, and its `FileDescriptorSet` handed to `tonic-prost-build`: a machine
//! with only the Rust toolchain builds the workspace, no system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=cnishift/v1/agent.proto");
    let descriptors = protox::compile(["cnishift/v1/agent.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
