//! Shared harness of the CUDA test binaries (`cuda_parity`, `cuda_model_parity`): the one GPU
//! backend of the process and the environment switches.
//!
//! - Without a usable GPU, [`gpu`] says that the test skipped (`tests/skip`) and returns
//!   `None`; with
//!   `MGKD_REQUIRE_GPU=1` a missing GPU is a failure (panic with the reason).
//! - `MGKD_PARITY_SELFTEST=1` ([`selftest`]): with no GPU, the tests run their comparisons
//!   with a CPU backend in place of the device, a check of the harness that needs no GPU.

use std::sync::OnceLock;

use mgkd::backend::cuda::CudaBackend;
use mgkd::backend::Backend;

/// The shared GPU backend, or `None` (after saying why, once per test, through
/// `crate::skip`: the test binary declares `mod skip;`) when there is none.
pub fn gpu() -> Option<&'static CudaBackend> {
    static GPU: OnceLock<Result<CudaBackend, String>> = OnceLock::new();
    let found = GPU.get_or_init(|| match CudaBackend::new(0) {
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

/// Whether `MGKD_PARITY_SELFTEST=1` asks for the harness self-test (used only without a GPU).
pub fn selftest() -> bool {
    std::env::var("MGKD_PARITY_SELFTEST").as_deref() == Ok("1")
}
