//! The emulated CUDA device (`tests/kernel_emu/device.cpp`) itself: a kernel of
//! `kernels/*.cu` runs on it through the driver API as cudarc calls it, and it refuses what
//! a GPU refuses (dynamic shared memory past a function's limit, a synchronisation under
//! stream capture) and reports what a GPU would fault on (a copy past an allocation's end,
//! which then stays the context's error), and work of two streams that nothing orders (a
//! kernel reading what another stream's copy writes, page-locked bytes rewritten before
//! their copy ran, memory freed while another stream writes it). The GPU suites run on it
//! in `.ci/run` (`MGKD_EMULATED_CUDA=1`); this checks that its checks can fail.

mod cuda_common;
mod kernel_emu;
mod skip;

use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};
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

/// Runs one of the ignored `stream_case_*` tests of this binary alone, in a process of its
/// own (a fault ends the emulated context for the rest of its process).
fn run_alone(case: &str) -> std::process::Output {
    std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args([
            "--ignored",
            "--exact",
            case,
            "--nocapture",
            "--test-threads=1",
        ])
        .output()
        .unwrap_or_else(|e| panic!("{case}: cannot run: {e}"))
}

#[test]
fn the_emulated_device_reports_work_of_two_streams_that_nothing_orders() {
    if kernel_emu::device_library().is_none() {
        return;
    }
    for (case, fault) in [
        ("stream_case_a_copy_awaited_through_an_event", None),
        (
            "stream_case_a_kernel_reading_what_another_streams_copy_writes",
            Some("a race on the allocation"),
        ),
        (
            "stream_case_page_locked_bytes_rewritten_before_their_copy_ran",
            Some("were rewritten after the call and before the copy ran"),
        ),
        (
            "stream_case_memory_freed_while_another_stream_writes_it",
            Some("cuMemFreeAsync (stream"),
        ),
    ] {
        let out = run_alone(case);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{case}:\n{stdout}\n{stderr}"
        );
        match fault {
            Some(fault) => assert!(stderr.contains(fault), "{case}: no `{fault}` in\n{stderr}"),
            None => assert!(
                !stderr.contains("emulated CUDA device:"),
                "{case}: a fault:\n{stderr}"
            ),
        }
    }
}

/// Elements of every buffer of the stream cases.
const N: usize = 100;

/// What every case starts from, on two streams of the emulated device with cudarc's own
/// ordering of buffers shared between streams off (as the backend has it), so that only the
/// case orders them: `x` (N zeros) allocated on the compute stream, and a copy of `host`
/// (1, 2, …, N, page-locked) into it queued on the copy stream after that allocation.
struct Upload {
    ctx: Arc<CudaContext>,
    copies: Arc<CudaStream>,
    compute: Arc<CudaStream>,
    x: CudaSlice<f32>,
    host: &'static mut [f32],
}

/// Sets up an [`Upload`].
fn upload_beside() -> Upload {
    cuda_common::load_emulated_device();
    let ctx = CudaContext::new(0).expect("context");
    // SAFETY: nothing is queued yet; the cases order their streams themselves.
    unsafe { ctx.disable_event_tracking() };
    let copies = ctx.new_stream().expect("copy stream");
    let compute = ctx.new_stream().expect("compute stream");
    let x = compute.alloc_zeros::<f32>(N).expect("x");
    // SAFETY: a fresh allocation of N floats, written in full below; never freed (the
    // process of a case ends with it).
    let p = unsafe { cudarc::driver::result::malloc_host(N * 4, 0) }.expect("page-locked");
    let host = unsafe { std::slice::from_raw_parts_mut(p.cast::<f32>(), N) };
    for (i, v) in host.iter_mut().enumerate() {
        *v = (i + 1) as f32;
    }
    copies
        .join(&compute)
        .expect("the copy after the allocation");
    let (dst, record) = x.device_ptr(&copies);
    // SAFETY: `x` holds N floats; the cases keep `host` unchanged until the copy is seen
    // done, or (the case that tests it) do not.
    unsafe { cudarc::driver::result::memcpy_htod_async(dst, &*host, copies.cu_stream()) }
        .expect("queue the copy");
    drop(record);
    Upload {
        ctx,
        copies,
        compute,
        x,
        host,
    }
}

/// Queues y = 2·x on the compute stream, into a new buffer `y` (axpy_f32 over zeros).
fn twice(up: &Upload) -> CudaSlice<f32> {
    let f = up
        .ctx
        .load_module(Ptx::from_src("kernels/copy.cu"))
        .expect("module")
        .load_function("axpy_f32")
        .expect("axpy_f32");
    let mut y = up.compute.alloc_zeros::<f32>(N).expect("y");
    let (n, alpha) = (N as i64, 2.0f32);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: axpy_f32(i64 n, float alpha, const float* x, float* y) over N elements of each.
    unsafe {
        up.compute
            .launch_builder(&f)
            .arg(&n)
            .arg(&alpha)
            .arg(&up.x)
            .arg(&mut y)
            .launch(cfg)
    }
    .expect("launch");
    y
}

/// Asserts that synchronising the context reports a fault (an illegal address).
fn assert_faults(ctx: &CudaContext, what: &str) {
    assert_eq!(
        ctx.synchronize().expect_err(what).0,
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
    );
}

#[test]
#[ignore = "run alone by the_emulated_device_reports_work_of_two_streams_that_nothing_orders"]
fn stream_case_a_copy_awaited_through_an_event() {
    let up = upload_beside();
    let copied = up.copies.record_event(None).expect("event");
    up.compute.wait(&copied).expect("wait");
    let y = twice(&up);
    // Into page-locked memory, read back only once the stream is seen done: before that the
    // device has not run the copy (it runs work when something waits for it).
    // SAFETY: a fresh allocation of N floats, filled by the copy below; never freed.
    let p = unsafe { cudarc::driver::result::malloc_host(N * 4, 0) }.expect("page-locked");
    let back = unsafe { std::slice::from_raw_parts_mut(p.cast::<f32>(), N) };
    let (src, _sync) = y.device_ptr(&up.compute);
    // SAFETY: `y` holds N floats, `back` has room for them.
    unsafe { cudarc::driver::result::memcpy_dtoh_async(&mut *back, src, up.compute.cu_stream()) }
        .expect("queue the copy back");
    assert!(
        back.iter().all(|v| v.to_bits() == u32::MAX),
        "filled before the wait"
    );
    up.compute.synchronize().expect("compute");
    let want: Vec<f32> = (1..=N).map(|i| 2.0 * i as f32).collect();
    assert_eq!(back.to_vec(), want);
    copied.synchronize().expect("the copy is done");
    up.host.fill(0.0); // rewritten after the wait: fine
    up.ctx.synchronize().expect("no fault");
}

#[test]
#[ignore = "run alone by the_emulated_device_reports_work_of_two_streams_that_nothing_orders"]
fn stream_case_a_kernel_reading_what_another_streams_copy_writes() {
    let up = upload_beside();
    // No wait for the copy: the kernel runs first, on the zeros.
    let y = twice(&up);
    assert_eq!(up.compute.clone_dtoh(&y).expect("y"), vec![0.0; N]);
    assert_faults(&up.ctx, "the race");
}

#[test]
#[ignore = "run alone by the_emulated_device_reports_work_of_two_streams_that_nothing_orders"]
fn stream_case_page_locked_bytes_rewritten_before_their_copy_ran() {
    let up = upload_beside();
    up.host.fill(-1.0); // the next batch, written before anything showed the copy done
    assert_faults(&up.ctx, "the rewrite");
}

#[test]
#[ignore = "run alone by the_emulated_device_reports_work_of_two_streams_that_nothing_orders"]
fn stream_case_memory_freed_while_another_stream_writes_it() {
    let up = upload_beside();
    drop(up.x); // freed in the compute stream's order, which never waited for the copy
    assert_faults(&up.ctx, "the race");
}
