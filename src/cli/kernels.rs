//! `mgkd-train kernels`: compiles the CUDA kernels for the named architectures into the
//! on-disk kernel cache (no GPU needed, only NVRTC), so that later processes on a machine of
//! that architecture load them instead of compiling them (docs/cuda.md, "Kernel cache").

use std::path::PathBuf;
use std::time::Instant;

use crate::backend::cuda::kernel_cache::{KernelCache, CACHE_ENV};
use crate::backend::cuda::nvrtc::{cached_image, nvrtc_version, Origin, SOURCES};
use crate::{Error, Result};

/// Arguments of `mgkd-train kernels`.
#[derive(Debug, clap::Args)]
pub struct KernelsArgs {
    /// Architectures to compile for, comma-separated (`sm_90` for H100/H200, `sm_80` for
    /// A100; `mgkd-train devices` prints a device's).
    #[arg(long, value_delimiter = ',', required = true, value_parser = parse_arch)]
    pub arch: Vec<String>,
    /// The cache directory to fill [default: the one in effect: $MGKD_KERNEL_CACHE, else
    /// $XDG_CACHE_HOME/mgkd/kernels, else ~/.cache/mgkd/kernels].
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

/// `sm_` followed by a two- or three-digit compute capability, optionally with the `a`
/// (architecture-specific) suffix: what NVRTC's `--gpu-architecture` takes for a CUBIN.
fn parse_arch(s: &str) -> std::result::Result<String, String> {
    let digits = s
        .strip_prefix("sm_")
        .map(|r| r.strip_suffix('a').unwrap_or(r))
        .unwrap_or("");
    if (2..=3).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "'{s}' is not a CUDA architecture of the form sm_XY (e.g. sm_90)"
        ))
    }
}

/// Compiles (or finds in the cache) every kernel file for every `--arch`, prints one row per
/// file and a total; fails when NVRTC is missing, a file does not compile, or an image cannot
/// be stored.
pub fn run(args: &KernelsArgs) -> Result<()> {
    let cache = match &args.cache {
        Some(dir) => KernelCache::new(dir),
        None => KernelCache::from_env().ok_or_else(|| {
            Error::invalid(format!(
                "the kernel cache is off ({CACHE_ENV} is 'off', or neither XDG_CACHE_HOME nor \
                 HOME is set); give --cache DIR"
            ))
        })?,
    };
    let (major, minor) = nvrtc_version().map_err(Error::device)?;
    crate::outln!(
        "kernel cache: {} (NVRTC {major}.{minor})",
        cache.dir().display()
    )?;
    crate::outln!(
        "{:<18} {:<7} {:>9} {:<10} {:>7}",
        "file",
        "arch",
        "bytes",
        "origin",
        "seconds"
    )?;
    for arch in &args.arch {
        let (mut cached, mut compiled) = (0usize, 0usize);
        for k in SOURCES {
            let t0 = Instant::now();
            let image = cached_image(k, arch, Some(&cache)).map_err(Error::device)?;
            if let Some(e) = image.store_error {
                return Err(Error::invalid(format!("kernel cache: cannot store: {e}")));
            }
            let origin = match &image.origin {
                Origin::Cached => {
                    cached += 1;
                    "cached"
                }
                Origin::Compiled => {
                    compiled += 1;
                    "compiled"
                }
                Origin::Replaced(why) => {
                    compiled += 1;
                    crate::noteln!("kernel cache: {why}; compiled again");
                    "replaced"
                }
            };
            crate::outln!(
                "{:<18} {:<7} {:>9} {:<10} {:>7.2}",
                k.file,
                arch,
                image.cubin.len(),
                origin,
                t0.elapsed().as_secs_f64()
            )?;
        }
        crate::outln!(
            "{arch}: {} files, {compiled} compiled, {cached} already in the cache",
            SOURCES.len()
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_arch;

    #[test]
    fn architectures_are_checked() {
        for ok in ["sm_90", "sm_80", "sm_90a", "sm_100", "sm_120a"] {
            assert_eq!(parse_arch(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "90",
            "sm90",
            "sm_9",
            "sm_9x",
            "compute_90",
            "sm_",
            "sm_1000",
            "",
        ] {
            let err = parse_arch(bad).unwrap_err();
            assert!(err.contains("sm_XY"), "{bad}: {err}");
        }
    }
}
