//! Deployment of the student: the ONNX export of its scoring graph ([`onnx`]) and the
//! generated protobuf messages it is written with ([`pb`]).

/// The ONNX protobuf messages, generated at build time from `proto/onnx.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic, unused_qualifications)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/onnx_pb/mod.rs"));
}

pub mod onnx;
