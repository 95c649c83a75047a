//! Compiles the agent contract with the pure-Rust `protox` compiler, so a fresh machine needs no
//! system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = "proto/ferry/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={file}");
    let fds = protox::compile([file], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
