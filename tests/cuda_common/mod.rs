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
//! - A test that gets the device holds it until it ends ([`gpu`]): tests take turns.
#![allow(dead_code)]

use std::cell::RefCell;
use std::sync::{Condvar, Mutex, OnceLock};
use std::thread::ThreadId;

use mgkd::backend::cuda::CudaBackend;
use mgkd::backend::Backend;

/// The shared GPU backend, held by the calling test until it ends (see [`take_turn`]), or
/// `None` (after saying why, once per test, through `crate::skip`: the test binary declares
/// `mod skip;`) when there is none.
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
        Ok(b) => {
            take_turn();
            Some(b)
        }
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

/// The test thread holding the device, and the signal that it let go.
static HOLDER: Mutex<Option<ThreadId>> = Mutex::new(None);
static LET_GO: Condvar = Condvar::new();

/// A test's turn on the device, given back when the test's thread ends (its thread-local
/// is dropped, after a panic too).
struct Turn;

impl Drop for Turn {
    fn drop(&mut self) {
        *HOLDER.lock().unwrap_or_else(|p| p.into_inner()) = None;
        LET_GO.notify_all();
    }
}

thread_local! {
    static TURN: RefCell<Option<Turn>> = const { RefCell::new(None) };
}

/// Waits until no other test holds the device, then holds it for the rest of this test
/// (libtest runs each test on a thread of its own, several at once). A backend queues one
/// sequence of operations at a time: the operations of a step share its scratch buffers,
/// and a stream under capture records whatever is queued on it. Two tests queueing at once
/// on the shared backend would interleave their operations (seen on the emulated device:
/// a student step's soft-label loss changed under a concurrent teacher test). The turn
/// belongs to the calling thread: a thread that a test spawns must not call [`gpu`] itself
/// (it would wait for the test), but may use the backend the test got.
fn take_turn() {
    TURN.with(|t| {
        if t.borrow().is_some() {
            return;
        }
        let me = std::thread::current().id();
        let mut holder = HOLDER.lock().unwrap_or_else(|p| p.into_inner());
        while holder.is_some_and(|h| h != me) {
            holder = LET_GO.wait(holder).unwrap_or_else(|p| p.into_inner());
        }
        *holder = Some(me);
        *t.borrow_mut() = Some(Turn);
    });
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
