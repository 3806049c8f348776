//! Generates the tonic/prost code for `cnishift/v1/agent.proto`, and the
//! client half of the subset of etcd's API in `etcd/rpc.proto` that the
//! agent's etcd client uses.
//!
//! The `.proto` files are parsed by `protox`, a protobuf compiler written in
//! Rust, and their `FileDescriptorSet`s handed to `tonic-prost-build`: a
//! machine with only the Rust toolchain builds the workspace, no system
//! `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=cnishift/v1/agent.proto");
    println!("cargo:rerun-if-changed=etcd/rpc.proto");
    let descriptors = protox::compile(["cnishift/v1/agent.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    // etcd is a server someone else wrote: only its client is generated.
    let etcd = protox::compile(["etcd/rpc.proto"], ["."])?;
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(etcd)?;
    Ok(())
}
