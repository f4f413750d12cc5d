//! NCCL, loaded at run time (like the other CUDA libraries: the binary runs where there is
//! none), for the CUDA backend's gradient all-reduce.
//!
//! The library is `$MGKD_NCCL_LIB` when set, else `libnccl.so.2` (the name the
//! `nvidia-nccl` wheels and the CUDA images ship), else `libnccl.so`. cudarc 0.19's NCCL
//! loader tries `libnccl.so` (the development link, absent from the wheels) and names
//! versioned like the CUDA libraries (`libnccl.so.13`, `.12`, …), never `libnccl.so.2`, and
//! panics when none loads; so the few entry points used here are bound directly: version,
//! unique id, communicator set-up and teardown, all-reduce, the error texts, and the
//! asynchronous error query a watchdog thread polls.
//!
//! A peer that dies leaves NCCL's kernels waiting on the others; NCCL notices the broken
//! connection in its proxy thread and reports it through `ncclCommGetAsyncError`. The
//! watchdog ([`NcclComm`]) polls that every [`WATCHDOG_POLL`] and aborts the communicator on
//! an error, which releases the waiting kernels: the rank's next synchronising call fails
//! with the error instead of hanging.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::{Error, Result};

/// Environment variable naming the NCCL library file to load.
pub const NCCL_LIB_ENV: &str = "MGKD_NCCL_LIB";
/// Library names tried when [`NCCL_LIB_ENV`] is not set.
pub const NCCL_LIB_NAMES: [&str; 2] = ["libnccl.so.2", "libnccl.so"];
/// How often the watchdog polls NCCL's asynchronous error.
pub const WATCHDOG_POLL: Duration = Duration::from_millis(500);

/// `ncclUniqueId`: 128 opaque bytes made by rank 0 and handed to every rank.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    /// The bytes.
    pub internal: [c_char; 128],
}

/// `ncclResult_t` values used here.
const NCCL_SUCCESS: c_int = 0;
/// `ncclInProgress`: a non-blocking operation still running (not an error).
const NCCL_IN_PROGRESS: c_int = 7;
/// `ncclFloat32`.
pub const NCCL_FLOAT32: c_int = 7;
/// `ncclSum`.
const NCCL_SUM: c_int = 0;

type Comm = *mut c_void;

/// The entry points of a loaded NCCL.
struct Api {
    get_version: unsafe extern "C" fn(*mut c_int) -> c_int,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> c_int,
    comm_init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> c_int,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        Comm,
        *mut c_void,
    ) -> c_int,
    comm_get_async_error: unsafe extern "C" fn(Comm, *mut c_int) -> c_int,
    comm_abort: unsafe extern "C" fn(Comm) -> c_int,
    comm_destroy: unsafe extern "C" fn(Comm) -> c_int,
    get_error_string: unsafe extern "C" fn(c_int) -> *const c_char,
    /// `ncclGetLastError` (NCCL 2.13 and later): the detail behind the last failure.
    get_last_error: Option<unsafe extern "C" fn(Comm) -> *const c_char>,
    /// Keeps the library loaded (the function pointers above point into it).
    _lib: libloading::Library,
}

/// The loaded NCCL, or why it could not be loaded (tried once per process).
fn api() -> Result<&'static Api> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .map_err(|e| Error::Device(e.clone()))
}

fn load() -> std::result::Result<Api, String> {
    let names: Vec<String> = match std::env::var(NCCL_LIB_ENV) {
        Ok(path) => vec![path],
        Err(_) => NCCL_LIB_NAMES.iter().map(|s| s.to_string()).collect(),
    };
    let mut tried = Vec::new();
    for name in &names {
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => return bind(lib).map_err(|e| format!("{name}: {e}")),
            Err(e) => {
                // libloading's message is "dlopen failed"; the loader's reason is its source.
                let why = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
                tried.push(format!("{name} ({why})"))
            }
        }
    }
    Err(format!(
        "NCCL could not be loaded: tried {}; install it (the nvidia-nccl-cu13 wheel, or the \
         CUDA image's libnccl2) or set {NCCL_LIB_ENV} to the library file",
        tried.join(", ")
    ))
}

fn bind(lib: libloading::Library) -> std::result::Result<Api, String> {
    // SAFETY: each symbol is looked up with the signature of NCCL's public header (nccl.h,
    // NCCL 2.x); the library stays loaded in `_lib` as long as the pointers live.
    unsafe {
        macro_rules! sym {
            ($name:literal) => {
                *lib.get($name)
                    .map_err(|e| format!("missing {}: {e}", String::from_utf8_lossy($name)))?
            };
        }
        Ok(Api {
            get_version: sym!(b"ncclGetVersion\0"),
            get_unique_id: sym!(b"ncclGetUniqueId\0"),
            comm_init_rank: sym!(b"ncclCommInitRank\0"),
            all_reduce: sym!(b"ncclAllReduce\0"),
            comm_get_async_error: sym!(b"ncclCommGetAsyncError\0"),
            comm_abort: sym!(b"ncclCommAbort\0"),
            comm_destroy: sym!(b"ncclCommDestroy\0"),
            get_error_string: sym!(b"ncclGetErrorString\0"),
            get_last_error: lib.get(b"ncclGetLastError\0").ok().map(|f| *f),
            _lib: lib,
        })
    }
}

/// NCCL's text for result `r`, with the detail of its last failure where it keeps one
/// (e.g. "unhandled cuda error …: Cuda failure 'no CUDA-capable device is detected'").
fn error_text(api: &Api, r: c_int) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any value.
    let p = unsafe { (api.get_error_string)(r) };
    let mut text = if p.is_null() {
        format!("NCCL error {r}")
    } else {
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    };
    // SAFETY: ncclGetLastError accepts a null communicator and returns a NUL-terminated
    // string owned by NCCL (or null).
    let last = api
        .get_last_error
        .map(|f| unsafe { f(std::ptr::null_mut()) });
    if let Some(p) = last.filter(|p| !p.is_null()) {
        // SAFETY: non-null and NUL-terminated; copied before any other NCCL call.
        let detail = unsafe { CStr::from_ptr(p) }.to_string_lossy();
        if !detail.trim().is_empty() {
            text = format!("{text}: {}", detail.trim());
        }
    }
    text
}

/// `Ok` for success, else an error naming `what`.
fn check(api: &Api, r: c_int, what: &str) -> Result<()> {
    if r == NCCL_SUCCESS {
        Ok(())
    } else {
        Err(Error::Device(format!(
            "NCCL {what}: {}",
            error_text(api, r)
        )))
    }
}

/// The loaded NCCL's version code (e.g. 22703 for 2.27.3); loads it first.
pub fn version() -> Result<i32> {
    let api = api()?;
    let mut v: c_int = 0;
    // SAFETY: writes one int.
    check(api, unsafe { (api.get_version)(&mut v) }, "version")?;
    Ok(v)
}

/// A new unique id (rank 0 makes it, the others receive it).
pub fn unique_id() -> Result<UniqueId> {
    let api = api()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: writes the 128-byte id.
    check(api, unsafe { (api.get_unique_id)(&mut id) }, "unique id")?;
    Ok(id)
}

/// The communicator handle, with the flag the watchdog sets when it has aborted it.
struct Handle {
    comm: Comm,
    aborted: bool,
}

// SAFETY: NCCL communicators may be used from any thread; every use goes through the mutex.
unsafe impl Send for Handle {}

/// One rank's NCCL communicator with its watchdog (see the module documentation).
pub struct NcclComm {
    handle: Arc<Mutex<Handle>>,
    /// The watchdog's verdict once it has aborted the communicator.
    failure: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    watchdog: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclComm")
    }
}

impl NcclComm {
    /// Joins rank `rank` of `world` to the communicator of `id` on the current CUDA context
    /// (blocks until every rank has joined) and starts the watchdog.
    pub fn init(rank: usize, world: usize, id: UniqueId) -> Result<NcclComm> {
        let api = api()?;
        let mut comm: Comm = std::ptr::null_mut();
        let (n, r) = (
            c_int::try_from(world).map_err(|_| Error::invalid("world size beyond 2^31"))?,
            c_int::try_from(rank).map_err(|_| Error::invalid("rank beyond 2^31"))?,
        );
        // SAFETY: writes the new communicator's handle.
        check(
            api,
            unsafe { (api.comm_init_rank)(&mut comm, n, id, r) },
            "init",
        )?;
        let handle = Arc::new(Mutex::new(Handle {
            comm,
            aborted: false,
        }));
        let failure = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (handle, failure, stop) = (handle.clone(), failure.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("nccl-watchdog-{rank}"))
                .spawn(move || watch(api, &handle, &failure, &stop))
                .map_err(|e| Error::Device(format!("NCCL watchdog thread: {e}")))?
        };
        Ok(NcclComm {
            handle,
            failure,
            stop,
            watchdog: Some(watchdog),
        })
    }

    /// Queues the in-place sum of `count` elements of type `dtype` (the backend's f32:
    /// [`NCCL_FLOAT32`]) at device address `ptr` over the ranks, on `stream`.
    ///
    /// # Safety
    /// `ptr` must be a live device buffer of at least `count` elements of `dtype`, and
    /// `stream` a live CUDA stream of the context the communicator was made in.
    pub unsafe fn all_reduce_sum(
        &self,
        ptr: u64,
        count: usize,
        dtype: c_int,
        stream: *mut c_void,
    ) -> Result<()> {
        let api = api()?;
        let h = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        if h.aborted {
            return Err(self.failure());
        }
        let p = ptr as *mut c_void;
        // SAFETY: the caller's contract covers the buffer and the stream; the handle is live
        // (not aborted, and not destroyed while `self` lives).
        let r = unsafe { (api.all_reduce)(p, p, count, dtype, NCCL_SUM, h.comm, stream) };
        check(api, r, "all-reduce")
    }

    /// The error that stopped the communicator.
    fn failure(&self) -> Error {
        let f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        Error::Distributed(
            f.clone()
                .unwrap_or_else(|| "the NCCL communicator was aborted".into()),
        )
    }
}

/// The watchdog: polls the communicator's asynchronous error until `stop`; on an error,
/// records it and aborts the communicator.
fn watch(api: &Api, handle: &Mutex<Handle>, failure: &Mutex<Option<String>>, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(WATCHDOG_POLL);
        let mut h = handle.lock().unwrap_or_else(|p| p.into_inner());
        if h.aborted {
            return;
        }
        let mut async_err: c_int = NCCL_SUCCESS;
        // SAFETY: the handle is live (not aborted, not destroyed while `stop` is unset).
        let r = unsafe { (api.comm_get_async_error)(h.comm, &mut async_err) };
        let bad = if r != NCCL_SUCCESS { r } else { async_err };
        if bad != NCCL_SUCCESS && bad != NCCL_IN_PROGRESS {
            let why = format!(
                "NCCL reported an error ({}): a peer rank failed or its connection broke",
                error_text(api, bad)
            );
            *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
            // SAFETY: aborting a live communicator releases its pending operations.
            unsafe { (api.comm_abort)(h.comm) };
            h.aborted = true;
            return;
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        let h = self.handle.lock().unwrap_or_else(|p| p.into_inner());
        if !h.aborted {
            if let Ok(api) = api() {
                // SAFETY: the communicator is live and no longer used.
                unsafe { (api.comm_destroy)(h.comm) };
            }
        }
    }
}
