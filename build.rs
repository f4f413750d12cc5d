//! Build script: generates the Rust types of the ONNX protobuf messages from the official
//! `proto/onnx.proto` (ONNX 1.23.2, Apache-2.0) with rust-protobuf's pure-Rust parser, so no
//! system `protoc` is needed. `src/export/mod.rs` includes the result.

fn main() {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    println!("cargo:rerun-if-changed=build.rs");
    protobuf_codegen::Codegen::new()
        .pure()
        .includes(["proto"])
        .input("proto/onnx.proto")
        .cargo_out_dir("onnx_pb")
        .run_from_script();
}
