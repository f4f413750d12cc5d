//! Shared harness of the CUDA test binaries (`cuda_parity`, `cuda_model_parity`): the one GPU
//! backend of the process and the environment switches.
//!
//! - Without a usable GPU, [`gpu`] prints that the test skipped and returns `None`; with
//!   `MGKD_REQUIRE_GPU=1` a missing GPU is a failure (panic with the reason).
//! - `MGKD_PARITY_SELFTEST=1` ([`selftest`]): with no GPU, the tests run their comparisons
//!   with a CPU backend in place of the device, a check of the harness that needs no GPU.

use std::sync::OnceLock;

use mgkd::backend::cuda::CudaBackend;
use mgkd::backend::Backend;

/// The shared GPU backend, or `None` (after printing why) when there is none.
pub fn gpu() -> Option<&'static CudaBackend> {
    static GPU: OnceLock<Option<CudaBackend>> = OnceLock::new();
    GPU.get_or_init(|| match CudaBackend::new(0) {
        Ok(b) => {
            println!("parity on {}", b.name());
            Some(b)
        }
        Err(e) => {
            if std::env::var("MGKD_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("MGKD_REQUIRE_GPU=1 but no usable GPU: {e}");
            }
            None
        }
    })
    .as_ref()
    .or_else(|| {
        if selftest() {
            println!("no usable CUDA device: harness self-test (CPU f32 against CPU f64)");
        } else {
            println!("skipped: no usable CUDA device");
        }
        None
    })
}

/// Whether `MGKD_PARITY_SELFTEST=1` asks for the harness self-test (used only without a GPU).
pub fn selftest() -> bool {
    std::env::var("MGKD_PARITY_SELFTEST").as_deref() == Ok("1")
}
