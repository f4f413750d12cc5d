//! Shared harness of the CUDA test binaries (`cuda_parity`, `cuda_model_parity`): the one GPU
//! backend of the process and the environment switches.
//!
//! - Without a usable GPU, [`gpu`] says that the test skipped (`tests/skip`) and returns
//!   `None`; with
//!   `MGKD_REQUIRE_GPU=1` a missing GPU is a failure (panic with the reason).
//! - `MGKD_PARITY_SELFTEST=1` ([`selftest`]): with no GPU, the tests run their comparisons
//!   with a CPU backend in place of the device, a check of the harness that needs no GPU.
//! - `MGKD_EMULATED_CUDA=1` ([`emulated`]): the device is the emulated one of
//!   `tests/kernel_emu/device.cpp` (the driver API, cuBLAS, cuBLASLt and every kernel on the
//!   CPU), so that the backend's host code runs without a GPU.
#![allow(dead_code)]

use std::sync::OnceLock;

use mgkd::backend::cuda::CudaBackend;
use mgkd::backend::Backend;

/// The shared GPU backend, or `None` (after saying why, once per test, through
/// `crate::skip`: the test binary declares `mod skip;`) when there is none.
pub fn gpu() -> Option<&'static CudaBackend> {
    static GPU: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    let found = GPU.get_or_init(|| match open_device() {
        Ok(b) => {
            println!("parity on {}", b.name());
            Ok(b)
        }
        Err(e) => {
            if std::env::var("MGKD_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("MGKD_REQUIRE_GPU=1 but no usable GPU: {e}");
            }
            Err(e.to_string())
        }
    });
    match found {
        Ok(b) => Some(b),
        Err(e) => {
            if selftest() {
                println!("no usable CUDA device: harness self-test (a CPU backend in the device's place)");
            } else {
                crate::skip::skip(&format!(
                    "no usable CUDA device ({e}); on a GPU machine: tools/gpu-check"
                ));
            }
            None
        }
    }
}

/// Device 0: the emulated device (`tests/kernel_emu/device.cpp`) where
/// `MGKD_EMULATED_CUDA=1` asks for it, else whatever CUDA the loader finds.
fn open_device() -> mgkd::Result<CudaBackend> {
    if emulated() {
        load_emulated_device();
    }
    CudaBackend::new(0)
}

/// Whether `MGKD_EMULATED_CUDA=1` asks for the emulated device.
pub fn emulated() -> bool {
    std::env::var("MGKD_EMULATED_CUDA").as_deref() == Ok("1")
}

/// Builds the emulated device and loads its three libraries by path, for the life of the
/// process: cudarc's later `dlopen("libcuda.so")` (and cuBLAS's, cuBLASLt's) then finds
/// them by their sonames, already loaded. Panics when g++ cannot be run (the switch asked
/// for the device).
pub fn load_emulated_device() {
    static LOADED: OnceLock<()> = OnceLock::new();
    LOADED.get_or_init(|| {
        let dir = crate::kernel_emu::device_library()
            .unwrap_or_else(|| panic!("MGKD_EMULATED_CUDA=1: the emulated device needs g++"));
        for lib in ["libcuda.so", "libcublas.so", "libcublasLt.so"] {
            let path = dir.join(lib);
            // SAFETY: the emulated device's own library, whose initialisers only set up
            // its tables.
            let l = unsafe { libloading::Library::new(&path) }
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            std::mem::forget(l);
        }
    });
}

/// Whether `MGKD_PARITY_SELFTEST=1` asks for the harness self-test (used only without a GPU).
pub fn selftest() -> bool {
    std::env::var("MGKD_PARITY_SELFTEST").as_deref() == Ok("1")
}
