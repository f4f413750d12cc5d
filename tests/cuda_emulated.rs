//! The emulated CUDA device (`tests/kernel_emu/device.cpp`) itself: a kernel of
//! `kernels/*.cu` runs on it through the driver API as cudarc calls it, and it refuses what
//! a GPU refuses (dynamic shared memory past a function's limit, a synchronisation under
//! stream capture) and reports what a GPU would fault on (a copy past an allocation's end,
//! which then stays the context's error). The GPU suites run on it in `.ci/run`
//! (`MGKD_EMULATED_CUDA=1`); this checks that its checks can fail.

mod cuda_common;
mod kernel_emu;
mod skip;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, DevicePtr, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;

#[test]
fn the_emulated_device_runs_kernels_and_refuses_what_a_gpu_refuses() {
    if kernel_emu::device_library().is_none() {
        return;
    }
    cuda_common::load_emulated_device();
    let ctx = CudaContext::new(0).expect("context");
    let stream = ctx.new_stream().expect("stream");
    // The image is not read: the device runs the kernels compiled into it.
    let module = ctx
        .load_module(Ptx::from_src("kernels/copy.cu"))
        .expect("module");
    let fill = module.load_function("fill_f32").expect("fill_f32");
    assert!(module.load_function("no_such_kernel").is_err());

    let len = 100usize;
    let mut x = stream.alloc_zeros::<f32>(len).expect("alloc");
    let (n, v) = (len as i64, 0.25f32);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: fill_f32(float* x, i64 n, float v) over the `len` elements of `x`.
    unsafe {
        stream
            .launch_builder(&fill)
            .arg(&mut x)
            .arg(&n)
            .arg(&v)
            .launch(cfg)
    }
    .expect("launch");
    let got = stream.clone_dtoh(&x).expect("download");
    assert!(got.iter().all(|&e| e == v), "fill_f32 wrote {got:?}");

    // 64 KiB of dynamic shared memory, past the 48 KiB a function has unless raised.
    let big = LaunchConfig {
        shared_mem_bytes: 64 * 1024,
        ..cfg
    };
    // SAFETY: as above (the launch is refused before it runs).
    let refused = unsafe {
        stream
            .launch_builder(&fill)
            .arg(&mut x)
            .arg(&n)
            .arg(&v)
            .launch(big)
    };
    assert_eq!(
        refused.expect_err("over the shared-memory limit").0,
        CUresult::CUDA_ERROR_INVALID_VALUE
    );

    // Synchronising a capturing stream fails and invalidates the capture.
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .expect("begin capture");
    assert_eq!(
        stream
            .synchronize()
            .expect_err("synchronise under capture")
            .0,
        CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED
    );
    let ended = stream
        .end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    assert_eq!(
        ended.err().map(|e| e.0),
        Some(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED)
    );

    // One element past the allocation: an illegal address, and the context's error from then on.
    let host = vec![1.0f32; len + 1];
    let (dst, _sync) = x.device_ptr(&stream);
    // SAFETY: the emulated device checks the destination range before copying anything.
    let copy = unsafe { cudarc::driver::result::memcpy_htod_async(dst, &host, stream.cu_stream()) };
    assert_eq!(
        copy.expect_err("a copy past the end").0,
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
    );
    assert_eq!(
        stream.synchronize().expect_err("the sticky error").0,
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
    );
}
