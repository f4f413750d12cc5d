//! Kernel check without a GPU: every `kernels/*.cu` is compiled by NVRTC to a CUBIN for sm_80
//! and sm_90 with `--ptxas-options=-v`; the test fails on a compile error, on a kernel that
//! spills registers or keeps a stack frame in local memory (unless its source says
//! `// mgkd: may-spill: <reason>`), or on a kernel the backend needs that a file does not
//! define. It prints ptxas's register/spill table.
//!
//! NVRTC is found through the dynamic loader (`LD_LIBRARY_PATH`, as `.ci/run` sets it); a
//! library path in `MGKD_NVRTC_LIB`, or else the wheel that `.ci/run` installs under
//! `.ci-tools/cuda`, is loaded first so that the by-name lookup finds it. Without NVRTC the
//! test says it skipped — unless `CI` is set, where a missing NVRTC is a failure.

mod skip;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mgkd::backend::cuda::nvrtc::{self, KernelSource};
use mgkd::backend::cuda::KERNELS;

const ARCHS: &[&str] = &["sm_80", "sm_90"];

/// The repository root: `CARGO_MANIFEST_DIR` at run time (cargo sets it), else the current
/// directory when it holds `kernels/` (a prebuilt test binary run from the repository, as
/// `tools/gpu-check` does), else the directory this test was built in.
fn repo_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        return PathBuf::from(dir);
    }
    if Path::new("kernels").is_dir() {
        return PathBuf::from(".");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Loads NVRTC and its builtins library (NVRTC opens it by name at compile time) by path,
/// kept loaded for the process, so that lookups by name (`libnvrtc.so.13`,
/// `libnvrtc-builtins.so.13.0`) resolve to them without `LD_LIBRARY_PATH`.
fn preload_nvrtc() {
    let root = repo_root();
    let nvrtc = std::env::var_os("MGKD_NVRTC_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".ci-tools/cuda/nvidia/cu13/lib/libnvrtc.so.13"));
    if !nvrtc.is_file() {
        return;
    }
    let mut libs = Vec::new();
    if let Some(dir) = nvrtc.parent() {
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("libnvrtc-builtins.so") {
                    libs.push(e.path());
                }
            }
        }
    }
    libs.push(nvrtc);
    for lib in libs {
        // SAFETY: loading the NVRTC libraries runs only their initialisers; the handles are
        // leaked on purpose (they stay loaded for the process).
        match unsafe { libloading::Library::new(&lib) } {
            Ok(l) => std::mem::forget(l),
            Err(e) => eprintln!("could not load {}: {e}", lib.display()),
        }
    }
}

/// One kernel's ptxas report.
#[derive(Debug, Default, Clone)]
struct Report {
    regs: u32,
    stack: u32,
    spill_st: u32,
    spill_ld: u32,
    smem: u32,
}

/// The first unsigned number in `s` that precedes `unit`.
fn number_before(s: &str, unit: &str) -> Option<u32> {
    let i = s.find(unit)?;
    s[..i].split_whitespace().last()?.parse().ok()
}

/// Parses NVRTC's log (ptxas `-v` lines) into per-kernel reports.
fn parse_log(log: &str) -> BTreeMap<String, Report> {
    let mut out: BTreeMap<String, Report> = BTreeMap::new();
    let mut cur: Option<String> = None;
    for line in log.lines() {
        if let Some(rest) = line
            .split("Compiling entry function '")
            .nth(1)
            .or_else(|| line.split("Function properties for ").nth(1))
        {
            let name = rest.split('\'').next().unwrap_or(rest).trim().to_string();
            out.entry(name.clone()).or_default();
            cur = Some(name);
            continue;
        }
        let Some(name) = cur.clone() else { continue };
        let r = out.entry(name).or_default();
        if line.contains("bytes stack frame") {
            r.stack = number_before(line, "bytes stack frame").unwrap_or(0);
            r.spill_st = number_before(line, "bytes spill stores").unwrap_or(0);
            r.spill_ld = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used ") && line.contains("registers") {
            r.regs = number_before(line, "registers").unwrap_or(0);
            r.smem = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// Whether the source of kernel `name` in `src` carries a `// mgkd: may-spill: <reason>`.
fn may_spill(src: &str, name: &str) -> bool {
    let Some(start) = src.find(&format!("void {name}(")) else {
        return false;
    };
    let body = &src[start..];
    let end = body[1..].find("extern \"C\"").map_or(body.len(), |i| i + 1);
    body[..end].lines().any(|l| {
        l.split("// mgkd: may-spill:")
            .nth(1)
            .is_some_and(|reason| !reason.trim().is_empty())
    })
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    preload_nvrtc();
    let version = match nvrtc::nvrtc_version() {
        Ok(v) => v,
        Err(why) => {
            skip::skip_unless_ci(&format!(
                "NVRTC is unavailable ({why}); .ci/run installs it, or set MGKD_NVRTC_LIB"
            ));
            return;
        }
    };
    println!("NVRTC {}.{}", version.0, version.1);

    // The files on disk must be exactly those the backend embeds.
    let dir = repo_root().join("kernels");
    let mut on_disk = BTreeSet::new();
    for e in std::fs::read_dir(&dir).expect("kernels/ is readable") {
        let name = e
            .expect("dir entry")
            .file_name()
            .to_string_lossy()
            .into_owned();
        if name.ends_with(".cu") {
            on_disk.insert(name);
        }
    }
    let embedded: BTreeSet<String> = nvrtc::SOURCES.iter().map(|k| k.file.to_string()).collect();
    assert_eq!(on_disk, embedded, "kernels/*.cu and nvrtc::SOURCES differ");

    let mut failures = Vec::new();
    let mut rows = Vec::new();
    for file in &on_disk {
        let text = std::fs::read_to_string(dir.join(file)).expect("kernel file is readable");
        let leaked: &'static str = Box::leak(text.clone().into_boxed_str());
        let fname: &'static str = Box::leak(file.clone().into_boxed_str());
        let ks = KernelSource {
            file: fname,
            src: leaked,
        };
        for arch in ARCHS {
            let compiled = match nvrtc::compile(&ks, arch, &["--ptxas-options=-v".to_string()]) {
                Ok(c) => c,
                Err(log) => {
                    failures.push(format!("{file} {arch}: {log}"));
                    continue;
                }
            };
            assert!(!compiled.cubin.is_empty(), "{file} {arch}: empty CUBIN");
            let reports = parse_log(&compiled.log);
            if reports.is_empty() {
                failures.push(format!(
                    "{file} {arch}: no ptxas report in the log:\n{}",
                    compiled.log
                ));
            }
            for k in KERNELS.iter().filter(|k| k.file == file.as_str()) {
                if !reports.contains_key(k.name) {
                    failures.push(format!("{} {arch}: kernel {} not defined", k.file, k.name));
                }
            }
            for (name, r) in &reports {
                // Spills, or a stack frame (a local array in slow local memory).
                let spills = r.spill_st > 0 || r.spill_ld > 0 || r.stack > 0;
                let allowed = spills && may_spill(&text, name);
                if spills && !allowed {
                    failures.push(format!(
                        "{file} {arch}: {name} spills ({} B stores, {} B loads, {} B stack \
                         frame) without a `// mgkd: may-spill: <reason>` comment",
                        r.spill_st, r.spill_ld, r.stack
                    ));
                }
                rows.push((
                    file.clone(),
                    arch.to_string(),
                    name.clone(),
                    r.clone(),
                    allowed,
                ));
            }
        }
    }
    println!(
        "{:<16} {:<6} {:<32} {:>5} {:>6} {:>6} {:>6} {:>6}",
        "file", "arch", "kernel", "regs", "stack", "spillS", "spillL", "smem"
    );
    for (file, arch, name, r, allowed) in &rows {
        println!(
            "{:<16} {:<6} {:<32} {:>5} {:>6} {:>6} {:>6} {:>6}{}",
            file,
            arch,
            name,
            r.regs,
            r.stack,
            r.spill_st,
            r.spill_ld,
            r.smem,
            if *allowed { "  (may spill)" } else { "" }
        );
    }
    assert!(
        failures.is_empty(),
        "kernel check failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn ptxas_report_is_parsed() {
    // Lines as NVRTC 13.0 prints them (captured from a kernel built with a register cap).
    let log = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'spill_probe' for 'sm_90'
ptxas info    : Function properties for spill_probe
ptxas         .     192 bytes stack frame, 192 bytes spill stores, 328 bytes spill loads
ptxas info    : Used 24 registers, used 0 barriers, 192 bytes cumulative stack size
ptxas info    : Compiling entry function 'sum_squares_partial' for 'sm_90'
ptxas info    : Function properties for sum_squares_partial
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 256 bytes smem
";
    let r = parse_log(log);
    let p = &r["spill_probe"];
    assert_eq!(
        (p.regs, p.stack, p.spill_st, p.spill_ld),
        (24, 192, 192, 328)
    );
    let q = &r["sum_squares_partial"];
    assert_eq!(
        (q.regs, q.stack, q.spill_st, q.spill_ld, q.smem),
        (32, 0, 0, 0, 256)
    );
    let src = "extern \"C\" __global__ void a(float* x) {\n  // mgkd: may-spill: big tile\n}\n\
               extern \"C\" __global__ void b(float* x) {\n}\n";
    assert!(may_spill(src, "a"));
    assert!(!may_spill(src, "b"));
}

/// `mgkd-train kernels` run with NVRTC on the loader path (the library's directory, found as
/// [`preload_nvrtc`] finds it, put before `LD_LIBRARY_PATH`).
fn kernels_cmd(args: &[&str]) -> std::process::Output {
    let root = repo_root();
    let nvrtc = std::env::var_os("MGKD_NVRTC_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".ci-tools/cuda/nvidia/cu13/lib/libnvrtc.so.13"));
    let mut path = nvrtc
        .parent()
        .map(|d| d.as_os_str().to_owned())
        .unwrap_or_default();
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    std::process::Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
        .arg("kernels")
        .args(args)
        .env("LD_LIBRARY_PATH", path)
        .output()
        .expect("mgkd-train runs")
}

/// The origin column of each file's row for `arch`, by file.
fn origins(stdout: &str, arch: &str) -> BTreeMap<String, String> {
    stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5 && f[1] == arch).then(|| (f[0].to_string(), f[3].to_string()))
        })
        .collect()
}

#[test]
fn the_kernel_cache_is_filled_then_served_and_a_damaged_entry_is_compiled_again() {
    preload_nvrtc();
    if let Err(why) = nvrtc::nvrtc_version() {
        skip::skip_unless_ci(&format!(
            "NVRTC is unavailable ({why}); .ci/run installs it, or set MGKD_NVRTC_LIB"
        ));
        return;
    }
    use mgkd::backend::cuda::kernel_cache::KernelCache;
    use mgkd::backend::cuda::nvrtc::{cached_image, Origin};
    let dir = std::env::temp_dir().join(format!("mgkd-kernels-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().expect("utf-8 temp path");
    let every = |origin: &str| -> BTreeMap<String, String> {
        nvrtc::SOURCES
            .iter()
            .map(|k| (k.file.to_string(), origin.to_string()))
            .collect()
    };

    // First run: every file compiled and stored.
    let out = kernels_cmd(&["--arch", "sm_90", "--cache", d]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(origins(&stdout, "sm_90"), every("compiled"), "{stdout}");
    let n = nvrtc::SOURCES.len();
    assert!(
        stdout.contains(&format!("sm_90: {n} files, {n} compiled, 0 already")),
        "{stdout}"
    );

    // What the cache serves is what NVRTC makes of the same source, byte for byte.
    let cache = KernelCache::new(&dir);
    let gelu = nvrtc::SOURCES
        .iter()
        .find(|k| k.file == "gelu.cu")
        .expect("gelu.cu");
    let served = cached_image(gelu, "sm_90", Some(&cache)).expect("cache readable");
    assert_eq!(served.origin, Origin::Cached);
    let fresh = nvrtc::compile(gelu, "sm_90", &[]).expect("gelu.cu compiles");
    assert_eq!(
        served.cubin, fresh.cubin,
        "cached image differs from a fresh compile"
    );

    // Second run: every file from the cache.
    let out = kernels_cmd(&["--arch", "sm_90", "--cache", d]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    assert_eq!(origins(&stdout, "sm_90"), every("cached"), "{stdout}");

    // A damaged entry is refused with its reason, compiled again and replaced.
    let entry = std::fs::read_dir(&dir)
        .expect("cache dir")
        .map(|e| e.expect("entry").path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("gelu.cu.sm_90."))
        })
        .expect("gelu.cu's entry");
    let mut bytes = std::fs::read(&entry).expect("entry readable");
    *bytes.last_mut().expect("non-empty") ^= 0x40;
    std::fs::write(&entry, &bytes).expect("entry writable");
    let out = kernels_cmd(&["--arch", "sm_90", "--cache", d]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}{stderr}");
    let mut want = every("cached");
    want.insert("gelu.cu".into(), "replaced".into());
    assert_eq!(origins(&stdout, "sm_90"), want, "{stdout}");
    assert!(stderr.contains("digest does not match"), "{stderr}");
    assert!(stderr.contains(&entry.display().to_string()), "{stderr}");
    let served = cached_image(gelu, "sm_90", Some(&cache)).expect("cache readable");
    assert_eq!((served.origin, served.cubin), (Origin::Cached, fresh.cubin));
    std::fs::remove_dir_all(&dir).expect("temp dir removable");

    // A cache path that is a file: an error naming it, nothing written.
    let file = std::env::temp_dir().join(format!("mgkd-kernels-file-{}", std::process::id()));
    std::fs::write(&file, b"not a directory").expect("temp file");
    let out = kernels_cmd(&["--arch", "sm_90", "--cache", file.to_str().expect("utf-8")]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert_eq!(
        std::fs::read(&file).expect("still there"),
        b"not a directory"
    );
    std::fs::remove_file(&file).expect("temp file removable");
}
