//! `mgkd-train devices`: what compute devices this machine offers, and why a CUDA device
//! cannot be used when it cannot.

use crate::backend::cuda::kernel_cache::{KernelCache, CACHE_ENV};
use crate::backend::cuda::nvrtc::nvrtc_version;
use crate::backend::cuda::CudaBackend;
use crate::backend::device::{cuda_device_count, probe_cuda, resolve, DeviceChoice, Resolved};
use crate::Result;

/// Arguments of `mgkd-train devices`.
#[derive(Debug, clap::Args)]
pub struct DevicesArgs {
    /// Exit with an error unless this device can be used (`cpu`, `cuda`, `cuda:N`, `auto`).
    #[arg(long, value_name = "DEVICE")]
    pub require: Option<DeviceChoice>,
}

/// Prints the CPU, NVRTC's version, the kernel cache in effect, every CUDA device (usable, or
/// the reason it is not; for a usable one, the kernels are compiled or read from the cache and
/// loaded, as a check) and what `--device auto` would pick; then fails if `--require` names a device that cannot be used.
pub fn run(args: &DevicesArgs) -> Result<()> {
    crate::outln!("cpu: available ({} threads)", rayon::current_num_threads())?;
    match nvrtc_version() {
        Ok((major, minor)) => crate::outln!("nvrtc: {major}.{minor}")?,
        Err(why) => crate::outln!("nvrtc: unavailable: {why}")?,
    }
    match KernelCache::from_env() {
        Some(cache) => crate::outln!("kernel cache: {}", cache.dir().display())?,
        None => crate::outln!("kernel cache: off ({CACHE_ENV})")?,
    }
    match cuda_device_count() {
        Err(why) => crate::outln!("cuda: unavailable: {why}")?,
        Ok(0) => crate::outln!("cuda: unavailable: the CUDA driver reports no device")?,
        Ok(n) => {
            for i in 0..n {
                match probe_cuda(i) {
                    Err(why) => crate::outln!("cuda:{i}: unusable: {why}")?,
                    Ok(info) => {
                        let t0 = std::time::Instant::now();
                        match CudaBackend::new(i) {
                            Ok(_) => crate::outln!(
                                "{info}: usable (kernels compiled or read from the cache, and \
                                 loaded, in {:.2} s)",
                                t0.elapsed().as_secs_f64()
                            )?,
                            Err(e) => crate::outln!("cuda:{i}: unusable: {e}")?,
                        }
                    }
                }
            }
        }
    }
    match resolve(DeviceChoice::Auto)? {
        Resolved::Cuda(info) => crate::outln!("--device auto: {info}")?,
        Resolved::Cpu { reason } => crate::outln!(
            "--device auto: cpu ({})",
            reason.as_deref().unwrap_or("requested")
        )?,
    }
    if let Some(required) = args.require {
        resolve(required)?;
        crate::outln!("--require {required}: ok")?;
    }
    Ok(())
}
