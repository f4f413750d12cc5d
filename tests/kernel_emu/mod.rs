//! A kernel lab without a GPU: any kernel of `kernels/*.cu`, compiled by g++ against the CUDA
//! execution model of `shim.h` (blocks one after another, threads as fibers, barriers,
//! shuffles, an emulated `mma.sync`; see its header), launched with buffers and arguments
//! from a test. Each kernel file becomes one emulator binary with a dispatcher generated from
//! the backend's launch table ([`KERNELS`]), so an argument list is checked against the
//! kernel's C parameter types before anything runs.
//!
//! What it checks is the kernel's own logic (indexing, masking, reductions, roundings, the
//! use of shared memory, which is NaN-filled before each block and fenced past the launch's
//! dynamic size); not the hardware, its timing, or the host code that launches the kernel
//! (a test builds each launch from the backend's public launch shapes: `grid1`, `rows_cfg`,
//! `chunk_grid`, `fine_cfg`, the attention's `mma_smem`, …). Without g++ a test says it
//! skipped (`skip`), except under `CI`, where it fails.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use mgkd::backend::cuda::KERNELS;

/// A buffer of the emulated device, in the element type the kernel sees.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// `float*`.
    F32(Vec<f32>),
    /// `bf16*`, as bit patterns.
    Bf16(Vec<u16>),
    /// `u32*`.
    U32(Vec<u32>),
    /// `double*`.
    F64(Vec<f64>),
    /// A struct passed by value (e.g. `EmbFields`), as its bytes.
    Bytes(Vec<u8>),
}

impl Data {
    /// The C type of a pointer to this buffer's elements (as in the launch table).
    fn pointer_type(&self) -> &'static str {
        match self {
            Data::F32(_) => "float*",
            Data::Bf16(_) => "bf16*",
            Data::U32(_) => "u32*",
            Data::F64(_) => "double*",
            Data::Bytes(_) => "struct",
        }
    }

    fn elem_bytes(&self) -> usize {
        match self {
            Data::F32(_) | Data::U32(_) => 4,
            Data::Bf16(_) => 2,
            Data::F64(_) => 8,
            Data::Bytes(_) => 1,
        }
    }

    fn len(&self) -> usize {
        match self {
            Data::F32(v) => v.len(),
            Data::Bf16(v) => v.len(),
            Data::U32(v) => v.len(),
            Data::F64(v) => v.len(),
            Data::Bytes(v) => v.len(),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Data::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Bf16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::U32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::F64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Data::Bytes(v) => v.clone(),
        }
    }

    /// Replaces the elements by those `b` holds (exactly `len · elem_bytes` bytes, which the
    /// caller checked).
    fn set_bytes(&mut self, b: &[u8]) {
        match self {
            Data::F32(v) => {
                for (x, c) in v.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Data::Bf16(v) => {
                for (x, c) in v.iter_mut().zip(b.chunks_exact(2)) {
                    *x = u16::from_le_bytes([c[0], c[1]]);
                }
            }
            Data::U32(v) => {
                for (x, c) in v.iter_mut().zip(b.chunks_exact(4)) {
                    *x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Data::F64(v) => {
                for (x, c) in v.iter_mut().zip(b.chunks_exact(8)) {
                    let mut w = [0u8; 8];
                    w.copy_from_slice(c);
                    *x = f64::from_le_bytes(w);
                }
            }
            Data::Bytes(v) => v.copy_from_slice(b),
        }
    }

    /// The elements as f64 (bf16 widened exactly; bytes as numbers).
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Data::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::Bf16(v) => v
                .iter()
                .map(|&b| half::bf16::from_bits(b).to_f64())
                .collect(),
            Data::U32(v) => v.iter().map(|&x| x as f64).collect(),
            Data::F64(v) => v.clone(),
            Data::Bytes(v) => v.iter().map(|&x| x as f64).collect(),
        }
    }

    /// `values` rounded to bf16 (to nearest, ties to even).
    pub fn bf16(values: &[f32]) -> Data {
        Data::Bf16(
            values
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect(),
        )
    }

    /// `n` bf16 NaNs (an output poisoned before the launch).
    pub fn bf16_nan(n: usize) -> Data {
        Data::Bf16(vec![0xffff; n])
    }

    /// `n` f32 NaNs.
    pub fn f32_nan(n: usize) -> Data {
        Data::F32(vec![f32::NAN; n])
    }
}

/// One argument of a launch.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A pointer to buffer `i` of the run (or, for a struct parameter, the struct it holds).
    Buf(usize),
    /// A pointer to element `k` of buffer `i` (a window the backend passes as `base + k`).
    BufAt(usize, usize),
    /// The null pointer (an absent optional buffer).
    Null,
    /// An `int`, `i64`, `u32` or `unsigned long long`.
    Int(i64),
    /// A `float`.
    F32(f32),
    /// A `double`.
    F64(f64),
}

/// One kernel launch: name, grid (x, y), one-dimensional block, dynamic shared memory in
/// bytes, arguments in the kernel's order.
#[derive(Debug, Clone)]
pub struct Launch {
    pub kernel: &'static str,
    pub grid: (u32, u32),
    pub block: u32,
    pub smem: u32,
    pub args: Vec<Arg>,
}

/// The emulator of one kernel file.
pub struct Emulator {
    file: &'static str,
    bin: PathBuf,
}

/// Where the emulators and their inputs live.
fn work_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emu");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    dir
}

/// The kernel source with what the emulation replaces: the inline PTX of an mma (by
/// `emu_mma`), where there is one, and each `extern __shared__ T name[];` (by a pointer to
/// the emulated dynamic shared memory). An error says what in the source it cannot take: an
/// unclosed or unknown architecture guard, other inline PTX, a malformed declaration.
pub fn emulable(src: &str) -> Result<String, String> {
    let mut src = src.to_string();
    while let Some(start) = src.find("#if __CUDA_ARCH__ >= 800") {
        let len = src[start..]
            .find("#endif")
            .ok_or("an `#if __CUDA_ARCH__` without its `#endif`")?;
        let end = start + len + "#endif".len();
        if !src[start..end].contains("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32") {
            return Err(format!(
                "an architecture guard the emulation does not know:\n{}",
                &src[start..end]
            ));
        }
        src.replace_range(start..end, "emu_mma(c, a, b0, b1);");
    }
    if src.contains("__CUDA_ARCH__") || src.contains("asm(") {
        return Err("architecture-specific code the emulation does not replace".into());
    }
    let key = "extern __shared__ ";
    while let Some(at) = src.find(key) {
        let len = src[at..]
            .find(';')
            .ok_or("an `extern __shared__` declaration without its `;`")?;
        let end = at + len + 1;
        let decl = &src[at + key.len()..end];
        let (ty, rest) = decl
            .split_once(' ')
            .ok_or_else(|| format!("`extern __shared__ {decl}`: expected a type and a name"))?;
        let name = rest.trim_end_matches("[];").trim();
        let with = format!("{ty}* {name} = ({ty}*)emu_shared();");
        src.replace_range(at..end, &with);
    }
    Ok(src)
}

/// The C++ expression passing argument `k` as a parameter of C type `c` (launch-table
/// spelling).
fn pass(c: &str, k: usize) -> String {
    match c {
        "int" => format!("(int)a[{k}].i"),
        "i64" => format!("(i64)a[{k}].i"),
        "u32" => format!("(u32)a[{k}].i"),
        "unsignedlonglong" => format!("(unsigned long long)a[{k}].i"),
        "float" => format!("a[{k}].f"),
        "double" => format!("a[{k}].d"),
        "unsignedlonglong*" => format!("(unsigned long long*)a[{k}].p"),
        p if p.ends_with('*') => format!("({p})a[{k}].p"),
        s => format!("*({s}*)a[{k}].p"),
    }
}

/// The dispatcher of `file`'s kernels, from the launch table.
fn dispatcher(file: &str) -> String {
    let mut out = String::from("bool emu_dispatch(const char* name, const EmuArg* a) {\n");
    for k in KERNELS.iter().filter(|k| k.file == file) {
        let args: Vec<String> = k
            .params
            .iter()
            .enumerate()
            .map(|(i, c)| pass(c, i))
            .collect();
        out += &format!(
            "  if (strcmp(name, \"{}\") == 0) {{ {}({}); return true; }}\n",
            k.name,
            k.name,
            args.join(", ")
        );
    }
    out + "  return false;\n}\n"
}

impl Emulator {
    /// The emulator of kernel file `file` (in `kernels/`), built once per process; `None`
    /// (after saying so, or failing under `CI`) where g++ cannot be run.
    pub fn of(file: &'static str) -> Option<Emulator> {
        static BUILT: OnceLock<Mutex<HashMap<&'static str, PathBuf>>> = OnceLock::new();
        if let Err(e) = Command::new("g++").arg("--version").output() {
            crate::skip::skip_unless_ci(&format!(
                "g++ cannot be run ({e}): the kernel emulation needs it"
            ));
            return None;
        }
        let mut built = BUILT.get_or_init(Default::default).lock().expect("lock");
        if let Some(bin) = built.get(file) {
            return Some(Emulator {
                file,
                bin: bin.clone(),
            });
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let read =
            |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        let source = [
            read("tests/kernel_emu/shim.h"),
            read("kernels/common.cuh"),
            emulable(&read(&format!("kernels/{file}")))
                .unwrap_or_else(|e| panic!("kernels/{file}: {e}")),
            dispatcher(file),
            read("tests/kernel_emu/runner.cpp"),
        ]
        .join("\n");
        let stem = file.trim_end_matches(".cu");
        let (src, bin) = (
            work_dir().join(format!("{stem}.cpp")),
            work_dir().join(stem),
        );
        std::fs::write(&src, source).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        run_tool(
            Command::new("g++")
                .args(GXX_FLAGS)
                .arg("-o")
                .arg(&bin)
                .arg(&src),
            &format!("g++ on {}", src.display()),
        );
        built.insert(file, bin.clone());
        Some(Emulator { file, bin })
    }

    /// Runs `launches` in order on `bufs` (updated in place with what the kernels wrote).
    /// Panics when an argument does not fit its parameter (kind, or a buffer's element type),
    /// or the emulator fails.
    pub fn run(&self, bufs: &mut [Data], launches: &[Launch]) {
        static RUN: AtomicU64 = AtomicU64::new(0);
        let mut input = Vec::new();
        input.extend((bufs.len() as u32).to_le_bytes());
        for b in bufs.iter() {
            input.extend((b.elem_bytes() as u32).to_le_bytes());
            input.extend((b.len() as u64).to_le_bytes());
            input.extend(b.bytes());
        }
        input.extend((launches.len() as u32).to_le_bytes());
        for l in launches {
            let decl = KERNELS
                .iter()
                .find(|k| k.name == l.kernel && k.file == self.file)
                .unwrap_or_else(|| panic!("no kernel {} in {}", l.kernel, self.file));
            assert_eq!(
                decl.params.len(),
                l.args.len(),
                "{}: {} arguments for {} parameters",
                l.kernel,
                l.args.len(),
                decl.params.len()
            );
            input.extend((l.kernel.len() as u32).to_le_bytes());
            input.extend(l.kernel.as_bytes());
            for v in [l.grid.0, l.grid.1, l.block, l.smem, l.args.len() as u32] {
                input.extend(v.to_le_bytes());
            }
            for (k, (a, c)) in l.args.iter().zip(decl.params).enumerate() {
                let (kind, payload): (u32, u64) = match *a {
                    Arg::Buf(i) => {
                        let want = if c.ends_with('*') { *c } else { "struct" };
                        let got = bufs.get(i).map(Data::pointer_type);
                        assert_eq!(got, Some(want), "{}: argument {k} ({c})", l.kernel);
                        (0, i as u64)
                    }
                    Arg::BufAt(i, at) => {
                        assert!(c.ends_with('*'), "{}: argument {k} ({c})", l.kernel);
                        let b = bufs
                            .get(i)
                            .unwrap_or_else(|| panic!("{}: argument {k}: no buffer {i}", l.kernel));
                        assert_eq!(b.pointer_type(), *c, "{}: argument {k}", l.kernel);
                        assert!(
                            at <= b.len(),
                            "{}: argument {k}: element {at} of {}",
                            l.kernel,
                            b.len()
                        );
                        let bytes = (at * b.elem_bytes()) as u64;
                        assert!(i < 1 << 16 && bytes < 1 << 48, "{}: argument {k}", l.kernel);
                        (5, i as u64 | bytes << 16)
                    }
                    Arg::Null => {
                        assert!(
                            c.ends_with('*'),
                            "{}: argument {k} is null, the parameter {c}",
                            l.kernel
                        );
                        (4, 0)
                    }
                    Arg::Int(v) => {
                        assert!(
                            ["int", "i64", "u32", "unsignedlonglong"].contains(c),
                            "{}: argument {k} is an integer, the parameter {c}",
                            l.kernel
                        );
                        (1, v as u64)
                    }
                    Arg::F32(v) => {
                        assert_eq!(*c, "float", "{}: argument {k}", l.kernel);
                        (2, v.to_bits() as u64)
                    }
                    Arg::F64(v) => {
                        assert_eq!(*c, "double", "{}: argument {k}", l.kernel);
                        (3, v.to_bits())
                    }
                };
                input.extend(kind.to_le_bytes());
                input.extend(payload.to_le_bytes());
            }
        }
        let n = RUN.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{}-{}-{n}", self.file, std::process::id());
        let (inp, outp) = (
            work_dir().join(format!("{tag}.in")),
            work_dir().join(format!("{tag}.out")),
        );
        std::fs::write(&inp, input).unwrap_or_else(|e| panic!("{}: {e}", inp.display()));
        let out = Command::new(&self.bin)
            .arg(&inp)
            .arg(&outp)
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", self.bin.display()));
        assert!(
            out.status.success(),
            "emulator of {} failed ({}): {}",
            self.file,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let data = std::fs::read(&outp).unwrap_or_else(|e| panic!("{}: {e}", outp.display()));
        let want: usize = bufs.iter().map(|b| b.len() * b.elem_bytes()).sum();
        assert_eq!(
            data.len(),
            want,
            "{}: {} bytes, the buffers hold {want}",
            outp.display(),
            data.len()
        );
        let mut at = 0;
        for b in bufs.iter_mut() {
            let bytes = b.len() * b.elem_bytes();
            b.set_bytes(&data[at..at + bytes]);
            at += bytes;
        }
        let _ = std::fs::remove_file(&inp);
        let _ = std::fs::remove_file(&outp);
    }
}

/// The C spelling of a launch-table type (which has its spaces removed).
fn c_spelling(c: &str) -> String {
    c.replace("unsignedlonglong", "unsigned long long")
}

/// One kernel file as a translation unit of the emulated device: shim.h, the prelude and the
/// kernels in a namespace of their own (so that each file keeps its own emulator state and
/// helpers), then `emu_exists_<stem>` and `emu_bind_<stem>`, which read a launch's
/// arguments from the driver's parameter array when it is queued and run it later, after
/// checking that every pointer argument points into device memory.
fn device_unit(file: &str, shim: &str, prelude: &str, kernels: &str) -> String {
    let stem = file.trim_end_matches(".cu");
    let system: Vec<&str> = shim.lines().filter(|l| l.starts_with("#include")).collect();
    let body: Vec<&str> = shim
        .lines()
        .filter(|l| !l.starts_with("#include"))
        .collect();
    let mut out = format!(
        "{}\n#include <memory>\nnamespace emu_{stem} {{\n{}\n{prelude}\n{kernels}\n}}\n",
        system.join("\n"),
        body.join("\n")
    );
    out += "void emu_check_pointer(const char* kernel, int k, const void* p);\n";
    let decls: Vec<_> = KERNELS.iter().filter(|k| k.file == file).collect();
    let names: Vec<String> = decls
        .iter()
        .map(|k| format!("strcmp(name, \"{}\") == 0", k.name))
        .collect();
    out += &format!(
        "bool emu_exists_{stem}(const char* name) {{ return {}; }}\n",
        names.join(" || ")
    );
    out += &format!(
        "std::function<void()> emu_bind_{stem}(const char* name, int gx, int gy, int gz, int \
         block, size_t smem, void** p) {{\n  using namespace emu_{stem};\n"
    );
    for k in decls {
        let reads: Vec<String> = k
            .params
            .iter()
            .enumerate()
            .map(|(i, c)| format!("    const auto a{i} = *({}*)p[{i}];\n", c_spelling(c)))
            .collect();
        let checks: Vec<String> = k
            .params
            .iter()
            .enumerate()
            .filter(|(_, c)| c.ends_with('*'))
            .map(|(i, _)| {
                format!(
                    "      emu_check_pointer(\"{}\", {i}, (const void*)a{i});\n",
                    k.name
                )
            })
            .collect();
        let args: Vec<String> = (0..k.params.len()).map(|i| format!("a{i}")).collect();
        out += &format!(
            "  if (strcmp(name, \"{name}\") == 0) {{\n{reads}    return [=] {{\n{checks}      \
             emu::launch(gx, gy, block, smem, [=] {{ {name}({args}); }}, gz);\n    }};\n  }}\n",
            name = k.name,
            reads = reads.concat(),
            checks = checks.concat(),
            args = args.join(", ")
        );
    }
    out + "  return {};\n}\n"
}

/// The translation unit joining the files' units: the two entry points
/// `tests/kernel_emu/device.cpp` declares.
fn device_table(files: &[&str]) -> String {
    let mut out = String::from("#include <string.h>\n#include <functional>\n");
    for f in files {
        let stem = f.trim_end_matches(".cu");
        out += &format!(
            "bool emu_exists_{stem}(const char*);\nstd::function<void()> emu_bind_{stem}(const \
             char*, int, int, int, int, size_t, void**);\n"
        );
    }
    let exists: Vec<String> = files
        .iter()
        .map(|f| format!("emu_exists_{}(name)", f.trim_end_matches(".cu")))
        .collect();
    out += &format!(
        "bool emu_kernel_exists(const char* name) {{ return {}; }}\n",
        exists.join(" || ")
    );
    out += "std::function<void()> emu_kernel_bind(const char* name, int gx, int gy, int gz, int \
            block, size_t smem, void** p) {\n";
    for f in files {
        let stem = f.trim_end_matches(".cu");
        out += &format!(
            "  if (emu_exists_{stem}(name)) return emu_bind_{stem}(name, gx, gy, gz, block, smem, p);\n"
        );
    }
    out + "  return {};\n}\n"
}

/// g++'s options for the emulation (see shim.h on -U_FORTIFY_SOURCE).
const GXX_FLAGS: &[&str] = &["-std=c++20", "-O2", "-w", "-U_FORTIFY_SOURCE"];

/// Runs `cmd`, panicking with its output when it fails.
fn run_tool(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    succeeded(&out, what);
}

/// Panics with the tool's error output unless it succeeded.
fn succeeded(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The emulated CUDA device (`tests/kernel_emu/device.cpp`): a directory holding
/// `libcuda.so` (the driver API, cuBLAS, cuBLASLt and every kernel of `kernels/*.cu`) and
/// `libcublas.so`, `libcublasLt.so` (which resolve to it), built once per source content;
/// `None` (after saying so, or failing under `CI`) where g++ cannot be run.
pub fn device_library() -> Option<PathBuf> {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    if let Err(e) = Command::new("g++").arg("--version").output() {
        crate::skip::skip_unless_ci(&format!(
            "g++ cannot be run ({e}): the emulated CUDA device needs it"
        ));
        return None;
    }
    Some(BUILT.get_or_init(build_device_library).clone())
}

fn build_device_library() -> PathBuf {
    use std::hash::{Hash, Hasher};
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read =
        |p: &str| std::fs::read_to_string(root.join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
    let (shim, prelude, device) = (
        read("tests/kernel_emu/shim.h"),
        read("kernels/common.cuh"),
        read("tests/kernel_emu/device.cpp"),
    );
    let mut files: Vec<&str> = KERNELS.iter().map(|k| k.file).collect();
    files.dedup();
    files.sort_unstable();
    files.dedup();
    let mut units: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            let src = emulable(&read(&format!("kernels/{f}")))
                .unwrap_or_else(|e| panic!("kernels/{f}: {e}"));
            let stem = f.trim_end_matches(".cu");
            (
                format!("kernels_{stem}.cpp"),
                device_unit(f, &shim, &prelude, &src),
            )
        })
        .collect();
    units.push(("kernel_table.cpp".into(), device_table(&files)));
    units.push(("device.cpp".into(), device));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    units.hash(&mut h);
    let dir = work_dir().join(format!("device-{:016x}", h.finish()));
    if dir.join("libcublasLt.so").exists() {
        return dir;
    }
    let tmp = work_dir().join(format!("device-build-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap_or_else(|e| panic!("{}: {e}", tmp.display()));
    // Two compilers at a time (CI has two cores).
    let mut objects = Vec::new();
    for pair in units.chunks(2) {
        let children: Vec<_> = pair
            .iter()
            .map(|(name, text)| {
                let src = tmp.join(name);
                std::fs::write(&src, text).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
                let obj = src.with_extension("o");
                objects.push(obj.clone());
                let child = Command::new("g++")
                    .args(GXX_FLAGS)
                    .args(["-fPIC", "-c", "-o"])
                    .arg(&obj)
                    .arg(&src)
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap_or_else(|e| panic!("g++ on {}: {e}", src.display()));
                (src, child)
            })
            .collect();
        for (src, child) in children {
            let what = format!("g++ on {}", src.display());
            let out = child
                .wait_with_output()
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            succeeded(&out, &what);
        }
    }
    run_tool(
        Command::new("g++")
            .args(["-shared", "-Wl,-soname,libcuda.so", "-o"])
            .arg(tmp.join("libcuda.so"))
            .args(&objects),
        "linking libcuda.so",
    );
    let empty = tmp.join("empty.c");
    std::fs::write(&empty, "").unwrap_or_else(|e| panic!("{}: {e}", empty.display()));
    for lib in ["libcublas.so", "libcublasLt.so"] {
        run_tool(
            Command::new("g++")
                .args(["-shared", "-fPIC", "-x", "c"])
                .arg(&empty)
                .arg(format!("-Wl,-soname,{lib}"))
                .args(["-Wl,--no-as-needed", "-L"])
                .arg(&tmp)
                .args(["-lcuda", "-o"])
                .arg(tmp.join(lib)),
            &format!("linking {lib}"),
        );
    }
    // Another process may have finished the same build first: either copy will do.
    if std::fs::rename(&tmp, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    dir
}
