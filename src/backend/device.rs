//! Device selection: `--device auto|cpu|cuda|cuda:N`.
//!
//! [`probe_cuda`] checks, without ever panicking, that a CUDA device can be used: the driver
//! library is present, the device exists and a context opens on it, and the libraries the
//! CUDA backend needs (NVRTC, cuBLAS) load. cudarc loads every CUDA library dynamically and
//! panics when one is missing, so each step checks for the library first and the whole probe
//! runs inside `catch_unwind`. [`resolve`] turns a [`DeviceChoice`] into the device to use:
//! `auto` falls back to the CPU with a one-line reason; an explicit `cuda` that cannot be
//! used is an error.

use std::fmt;
use std::str::FromStr;

use crate::backend::cuda::nvrtc::{nvrtc_version, quietly};
use crate::{Error, Result};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    /// A CUDA device when one works (device 0), else the CPU.
    Auto,
    /// The CPU reference backend.
    Cpu,
    /// CUDA device number N (`cuda` means `cuda:0`).
    Cuda(usize),
}

impl FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse::<usize>().map(DeviceChoice::Cuda).map_err(|_| {
                    format!(
                        "device `{other}`: the CUDA device number must be a non-negative integer"
                    )
                }),
                None => Err(format!(
                    "device `{other}`: expected auto, cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceChoice::Auto => write!(f, "auto"),
            DeviceChoice::Cpu => write!(f, "cpu"),
            DeviceChoice::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// A usable CUDA device, as the probe found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    /// Device number.
    pub index: usize,
    /// Device name from the driver.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total device memory in bytes.
    pub total_mem: usize,
    /// NVRTC version (major, minor).
    pub nvrtc: (i32, i32),
}

impl CudaDeviceInfo {
    /// The NVRTC architecture name of the device (`sm_90`).
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }
}

impl fmt::Display for CudaDeviceInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cuda:{} {} (sm_{}{}, {:.1} GiB, NVRTC {}.{})",
            self.index,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.total_mem as f64 / (1u64 << 30) as f64,
            self.nvrtc.0,
            self.nvrtc.1
        )
    }
}

/// Number of CUDA devices the driver reports, or why there are none usable (no driver
/// library, driver error).
pub fn cuda_device_count() -> std::result::Result<usize, String> {
    quietly("CUDA driver", || {
        // SAFETY: only tries to open the driver library by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err("no CUDA driver found (libcuda.so could not be loaded)".into());
        }
        let n = cudarc::driver::CudaContext::device_count()
            .map_err(|e| format!("the CUDA driver failed to count devices: {e}"))?;
        Ok(usize::try_from(n).unwrap_or(0))
    })
}

/// Checks that CUDA device `index` can run the CUDA backend; returns its description, or a
/// one-line reason why not.
pub fn probe_cuda(index: usize) -> std::result::Result<CudaDeviceInfo, String> {
    let count = cuda_device_count()?;
    if count == 0 {
        return Err("the CUDA driver reports no device".into());
    }
    if index >= count {
        return Err(format!(
            "CUDA device {index} does not exist ({count} device{} found)",
            if count == 1 { "" } else { "s" }
        ));
    }
    let (name, compute_capability, total_mem) = quietly("CUDA driver", || {
        let ctx = cudarc::driver::CudaContext::new(index)
            .map_err(|e| format!("cannot open a context on CUDA device {index}: {e}"))?;
        let name = ctx
            .name()
            .map_err(|e| format!("device {index} name: {e}"))?;
        let cc = ctx
            .compute_capability()
            .map_err(|e| format!("device {index} compute capability: {e}"))?;
        let mem = ctx
            .total_mem()
            .map_err(|e| format!("device {index} memory: {e}"))?;
        Ok((name, cc, mem))
    })?;
    let nvrtc = nvrtc_version().map_err(|e| {
        format!("CUDA device {index} found, but the kernels cannot be compiled: {e}")
    })?;
    quietly("cuBLAS", || {
        // SAFETY: only tries to open the library by name.
        if unsafe { cudarc::cublas::sys::is_culib_present() } {
            Ok(())
        } else {
            Err(format!(
                "CUDA device {index} found, but cuBLAS (libcublas.so) could not be loaded"
            ))
        }
    })?;
    Ok(CudaDeviceInfo {
        index,
        name,
        compute_capability,
        total_mem,
        nvrtc,
    })
}

/// The device a run will use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// The CPU; with `auto`, the one-line reason no CUDA device is used.
    Cpu {
        /// Why CUDA was not chosen (`None` when the CPU was asked for).
        reason: Option<String>,
    },
    /// A working CUDA device.
    Cuda(CudaDeviceInfo),
}

/// The CUDA device `auto` takes: 0, or a data-parallel rank's `LOCAL_RANK` ([`auto_device`]).
static AUTO_INDEX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Makes `auto` take CUDA device `index` (a data-parallel rank's `LOCAL_RANK`, so that the
/// ranks of a node use one GPU each); the first call wins.
pub fn auto_device(index: usize) {
    let _ = AUTO_INDEX.set(index);
}

/// Resolves a choice: `cpu` → CPU; `cuda[:N]` → that device or an error saying why it cannot
/// be used; `auto` → CUDA device 0 (a data-parallel rank's `LOCAL_RANK`, see
/// [`auto_device`]) when it works, else the CPU with the reason.
pub fn resolve(choice: DeviceChoice) -> Result<Resolved> {
    let auto_index = *AUTO_INDEX.get().unwrap_or(&0);
    match choice {
        DeviceChoice::Cpu => Ok(Resolved::Cpu { reason: None }),
        DeviceChoice::Cuda(i) => probe_cuda(i)
            .map(Resolved::Cuda)
            .map_err(|why| Error::device(format!("cuda:{i} cannot be used: {why}"))),
        DeviceChoice::Auto => Ok(match probe_cuda(auto_index) {
            Ok(info) => Resolved::Cuda(info),
            Err(why) => Resolved::Cpu { reason: Some(why) },
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_and_rejects_others() {
        assert_eq!("auto".parse::<DeviceChoice>(), Ok(DeviceChoice::Auto));
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert_eq!("cuda".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:3".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(3)));
        assert!("cuda:".parse::<DeviceChoice>().is_err());
        assert!("cuda:-1".parse::<DeviceChoice>().is_err());
        assert!("gpu".parse::<DeviceChoice>().is_err());
        for c in [DeviceChoice::Auto, DeviceChoice::Cpu, DeviceChoice::Cuda(2)] {
            assert_eq!(c.to_string().parse::<DeviceChoice>(), Ok(c));
        }
    }

    #[test]
    fn probe_never_panics_and_auto_always_resolves() {
        // Whatever this machine has, the probe answers (device or reason) and `auto` picks a
        // device; `cuda` is an error exactly when the probe gives a reason.
        let probe = probe_cuda(0);
        match resolve(DeviceChoice::Auto).expect("auto always resolves") {
            Resolved::Cuda(info) => assert_eq!(Ok(info), probe),
            Resolved::Cpu { reason } => {
                assert_eq!(reason.as_deref(), probe.as_ref().err().map(String::as_str));
                let err = resolve(DeviceChoice::Cuda(0)).expect_err("cuda must fail here");
                assert!(err.to_string().contains("cuda:0"));
            }
        }
        assert!(probe_cuda(usize::MAX).is_err());
    }
}
