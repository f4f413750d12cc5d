//! Run-time compilation of the project's kernels (`kernels/*.cu`) through NVRTC.
//!
//! Every kernel file is compiled on its own, with the shared prelude `kernels/common.cuh`
//! prepended (so NVRTC needs no include path), straight to a CUBIN for one real architecture
//! (`--gpu-architecture=sm_XX`): what the tests compile is exactly what the backend loads.
//! Compiled images are kept for the process per architecture, and on disk across processes
//! (`kernel_cache`).
//!
//! NVRTC is loaded dynamically; cudarc panics when the library is missing, so every entry
//! point here first checks for the library and runs inside `catch_unwind`, turning each
//! failure into an error message.

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result as nv, sys as nvsys};

use super::kernel_cache::{KernelCache, CACHE_ENV};

/// One kernel source file of `kernels/`.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name inside `kernels/` (also the NVRTC program name).
    pub file: &'static str,
    /// The file's text.
    pub src: &'static str,
}

/// The prelude prepended to every kernel file (`kernels/common.cuh`).
pub const PRELUDE: &str = include_str!("../../../kernels/common.cuh");

/// Every kernel file the backend loads, one per op family.
pub const SOURCES: &[KernelSource] = &[
    KernelSource {
        file: "copy.cu",
        src: include_str!("../../../kernels/copy.cu"),
    },
    KernelSource {
        file: "gelu.cu",
        src: include_str!("../../../kernels/gelu.cu"),
    },
    KernelSource {
        file: "layernorm.cu",
        src: include_str!("../../../kernels/layernorm.cu"),
    },
    KernelSource {
        file: "embedding.cu",
        src: include_str!("../../../kernels/embedding.cu"),
    },
    KernelSource {
        file: "attention.cu",
        src: include_str!("../../../kernels/attention.cu"),
    },
    KernelSource {
        file: "attention_mma.cu",
        src: include_str!("../../../kernels/attention_mma.cu"),
    },
    KernelSource {
        file: "softmax.cu",
        src: include_str!("../../../kernels/softmax.cu"),
    },
    KernelSource {
        file: "pooling.cu",
        src: include_str!("../../../kernels/pooling.cu"),
    },
    KernelSource {
        file: "losses.cu",
        src: include_str!("../../../kernels/losses.cu"),
    },
    KernelSource {
        file: "adamw.cu",
        src: include_str!("../../../kernels/adamw.cu"),
    },
];

/// Environment variable naming an extra include directory handed to NVRTC (`-I`), for
/// kernels that include CUDA headers; the project's own kernels need none.
pub const INCLUDE_ENV: &str = "MGKD_CUDA_INCLUDE";

/// A compiled kernel file: its CUBIN and NVRTC's program log (which holds ptxas's
/// register/spill report when `--ptxas-options=-v` was given).
#[derive(Debug, Clone)]
pub struct Compiled {
    /// The CUBIN image for the requested architecture.
    pub cubin: Vec<u8>,
    /// The program log (warnings, ptxas `-v` output).
    pub log: String,
}

/// Runs `f`, turning a panic into `Err` without printing it (cudarc panics when a CUDA
/// library or symbol is missing). The panic hook is swapped for a silent one for the
/// duration (once per thread: nested calls just catch).
pub(crate) fn quietly<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    use std::cell::Cell;
    static HOOK_LOCK: Mutex<()> = Mutex::new(());
    thread_local! {
        static DEPTH: Cell<u32> = const { Cell::new(0) };
    }
    let outer = DEPTH.with(|d| {
        d.set(d.get() + 1);
        d.get() == 1
    });
    let out = if outer {
        let _guard = HOOK_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        std::panic::set_hook(prev);
        out
    } else {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
    };
    DEPTH.with(|d| d.set(d.get() - 1));
    match out {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            let first = msg.lines().next().unwrap_or("").to_string();
            Err(format!("{what}: {first}"))
        }
    }
}

/// NVRTC's version `(major, minor)`, or why NVRTC cannot be used (library not found: it is
/// looked up by name, `libnvrtc.so.13` and the like, through the dynamic loader's path, e.g.
/// `LD_LIBRARY_PATH`).
pub fn nvrtc_version() -> Result<(i32, i32), String> {
    quietly("NVRTC", || {
        // SAFETY: only tries to open the library by name.
        if !unsafe { nvsys::is_culib_present() } {
            return Err("NVRTC library (libnvrtc.so) not found on the loader path".into());
        }
        let (mut major, mut minor) = (0i32, 0i32);
        // SAFETY: two valid out-pointers.
        unsafe { nvsys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| format!("nvrtcVersion failed: {e:?}"))?;
        Ok((major, minor))
    })
}

/// The full NVRTC source of a kernel file: prelude, then the file with its own line numbers.
pub fn full_source(k: &KernelSource) -> String {
    format!("{PRELUDE}\n#line 1 \"{}\"\n{}", k.file, k.src)
}

/// NVRTC's options for `arch` with `extra` appended: the architecture, C++17, and the
/// include path of [`INCLUDE_ENV`] when it is set.
fn compile_options(arch: &str, extra: &[String]) -> Vec<String> {
    let mut opts = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
    ];
    if let Some(dir) = std::env::var_os(INCLUDE_ENV) {
        opts.push(format!("--include-path={}", dir.to_string_lossy()));
    }
    opts.extend(extra.iter().cloned());
    opts
}

/// Compiles one kernel file for `arch` (`"sm_90"`), with `extra` options appended (e.g.
/// `--ptxas-options=-v`). On failure the error holds NVRTC's log.
pub fn compile(k: &KernelSource, arch: &str, extra: &[String]) -> Result<Compiled, String> {
    let src = CString::new(full_source(k)).map_err(|_| format!("{}: NUL in source", k.file))?;
    let name = CString::new(k.file).map_err(|_| format!("{}: NUL in name", k.file))?;
    let opts = compile_options(arch, extra);
    let file = k.file;
    nvrtc_version()?;
    quietly("NVRTC", move || {
        let prog = nv::create_program(&src, Some(&name))
            .map_err(|e| format!("{file}: nvrtcCreateProgram: {e:?}"))?;
        // SAFETY: `prog` is a live program until destroyed below.
        let compiled = unsafe { nv::compile_program(prog, &opts) };
        // SAFETY: as above.
        let log = unsafe { nv::get_program_log(prog) }
            .map(|raw| {
                let bytes: Vec<u8> = raw
                    .into_iter()
                    .map(|c| c as u8)
                    .take_while(|&c| c != 0)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        let result = match compiled {
            Err(e) => Err(format!(
                "{file} ({arch}): compilation failed ({e:?}):\n{log}"
            )),
            Ok(()) => {
                let mut size = 0usize;
                // SAFETY: valid program and out-pointer; the buffer has `size` bytes.
                unsafe {
                    nvsys::nvrtcGetCUBINSize(prog, &mut size)
                        .result()
                        .map_err(|e| format!("{file}: nvrtcGetCUBINSize: {e:?}"))?;
                    let mut cubin = vec![0u8; size];
                    nvsys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut std::ffi::c_char)
                        .result()
                        .map_err(|e| format!("{file}: nvrtcGetCUBIN: {e:?}"))?;
                    Ok(Compiled { cubin, log })
                }
            }
        };
        // SAFETY: destroyed exactly once.
        let _ = unsafe { nv::destroy_program(prog) };
        result
    })
}

/// Where a kernel file's image came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The on-disk cache held it.
    Cached,
    /// Compiled: no cache, or no entry for these inputs yet.
    Compiled,
    /// Compiled because the cache's entry was refused (the reason).
    Replaced(String),
}

/// One kernel file's image for an architecture, and how it was obtained.
#[derive(Debug, Clone)]
pub struct Image {
    /// The CUBIN.
    pub cubin: Vec<u8>,
    /// From the cache, or compiled.
    pub origin: Origin,
    /// Why a freshly compiled image could not be stored in the cache, if it could not.
    pub store_error: Option<String>,
}

/// The image of `k` for `arch` (default options): from `cache` when it holds a usable
/// entry, else compiled by NVRTC and stored there (`kernel_cache` module).
pub fn cached_image(
    k: &KernelSource,
    arch: &str,
    cache: Option<&KernelCache>,
) -> Result<Image, String> {
    let Some(cache) = cache else {
        let cubin = compile(k, arch, &[])?.cubin;
        return Ok(Image {
            cubin,
            origin: Origin::Compiled,
            store_error: None,
        });
    };
    let key = KernelCache::key(k, arch, &compile_options(arch, &[]), nvrtc_version()?);
    let origin = match cache.load(k, arch, &key) {
        Ok(Some(cubin)) => {
            return Ok(Image {
                cubin,
                origin: Origin::Cached,
                store_error: None,
            })
        }
        Ok(None) => Origin::Compiled,
        Err(why) => Origin::Replaced(why),
    };
    let cubin = compile(k, arch, &[])?.cubin;
    let store_error = cache.store(k, arch, &key, &cubin).err();
    Ok(Image {
        cubin,
        origin,
        store_error,
    })
}

/// The CUBIN image of every kernel file (file name, image) for one architecture.
pub type Images = Arc<Vec<(&'static str, Vec<u8>)>>;

/// CUBIN images of every kernel file for `arch`, once per process and architecture, through
/// the on-disk cache the environment chooses ([`KernelCache::from_env`]). A refused cache
/// entry or a cache that cannot be written is said on stderr, and the kernels are compiled.
pub fn images(arch: &str) -> Result<Images, String> {
    type Cache = Mutex<HashMap<String, Images>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(hit) = map.get(arch) {
        return Ok(hit.clone());
    }
    let disk = KernelCache::from_env();
    let mut out = Vec::with_capacity(SOURCES.len());
    let mut store_failed = false;
    for k in SOURCES {
        let image = cached_image(k, arch, disk.as_ref())?;
        if let Origin::Replaced(why) = &image.origin {
            crate::noteln!("warning: kernel cache: {why}; compiled again");
        }
        if let (Some(e), false) = (&image.store_error, store_failed) {
            store_failed = true;
            crate::noteln!(
                "warning: kernel cache: cannot store a compiled kernel ({e}); kernels are \
                 compiled at every start ({CACHE_ENV}=off turns the cache off)"
            );
        }
        out.push((k.file, image.cubin));
    }
    let out = Arc::new(out);
    map.insert(arch.to_string(), out.clone());
    Ok(out)
}
