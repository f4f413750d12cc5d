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
        let out = Command::new("g++")
            .args(["-std=c++20", "-O2", "-w", "-o"])
            .arg(&bin)
            .arg(&src)
            .output()
            .unwrap_or_else(|e| panic!("g++ on {}: {e}", src.display()));
        assert!(
            out.status.success(),
            "g++ failed on {}:\n{}",
            src.display(),
            String::from_utf8_lossy(&out.stderr)
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
