//! `tools/gpu-check`'s own logic, without a GPU: the script runs against stand-ins (shell
//! scripts in the place of the prepared test binaries, `mgkd-train`, the PyTorch twin's
//! Python, `ncu` and `nvidia-smi`) that record how they were called and answer as the real
//! programs would, pass, fail or hang. A lent GPU's time is short: these checks make sure that
//! a run there goes through its steps in order, limits each in time, stops starting steps
//! when its budget is spent, names every step's outcome, and returns its logs in the few
//! files a device call brings back.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A scratch directory for one test.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("mgkd-gpu-check-{tag}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// Writes an executable shell script.
fn script(path: &Path, body: &str) {
    fs::write(path, format!("#!/usr/bin/env bash\n{body}\n")).expect("write stand-in");
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).expect("chmod stand-in");
}

/// The prepared-binaries directory and the tools directory of stand-ins. `behaviour` maps a
/// test binary to its body (default: one passing `test result` line). Every stand-in appends
/// `name args | MGKD_REQUIRE_GPU MGKD_CUDA_ATTENTION MGKD_KERNEL_CACHE` to `calls.log`.
fn stand_ins(dir: &Path, behaviour: &[(&str, &str)]) -> (PathBuf, PathBuf) {
    let bin = dir.join("bin");
    let tools = dir.join("tools");
    fs::create_dir_all(&bin).expect("bin dir");
    fs::create_dir_all(&tools).expect("tools dir");
    let log = dir.join("calls.log");
    let record = format!(
        "echo \"$(basename \"$0\") $* | ${{MGKD_REQUIRE_GPU:-}} ${{MGKD_CUDA_ATTENTION:-}} \
         ${{MGKD_KERNEL_CACHE:-}}\" >> '{}'",
        log.display()
    );
    for t in [
        "cuda_parity",
        "cuda_model_parity",
        "cuda_train",
        "cuda_arena",
        "teacher_cache",
        "kernels_compile",
        "dist",
        "cuda_bf16_parity",
        "cuda_bf16_ops",
        "cuda_ops",
    ] {
        let body = behaviour
            .iter()
            .find(|(name, _)| *name == t)
            .map(|(_, b)| b.to_string())
            .unwrap_or_else(|| format!("echo 'test result: ok. 3 passed; 0 failed; {t}'"));
        script(&bin.join(t), &format!("{record}\n{body}"));
    }
    // mgkd-train: `devices` answers, `bench --out F` writes one row of bench's JSON.
    script(
        &bin.join("mgkd-train"),
        &format!(
            r#"{record}
if [ "$1" = devices ]; then echo "cuda:0 stand-in: usable"; exit 0; fi
out=""; prec=f32; modes=eager
while [ $# -gt 0 ]; do
  case "$1" in --out) out=$2; shift ;; --precision) prec=$2; shift ;; --modes) modes=$2; shift ;; esac
  shift
done
[ -n "$out" ] || exit 0
mode=${{modes%%,*}}
cat > "$out" <<JSON
{{"engine": "mgkd", "device": "stand-in", "results": [{{"stage": "student", "batching": "padded",
 "mode": "$mode", "precision": "$prec", "samples_per_s": 100000.0, "ms_per_step": 10.24,
 "tflops": 22.0, "peak_mem_bytes": 1048576, "launches_per_step": 300}}]}}
JSON"#
        ),
    );
    // The twin's Python: writes one row per --rows entry.
    script(
        &tools.join("python-with-torch"),
        &format!(
            r#"{record}
json=""; rows=""
while [ $# -gt 0 ]; do
  case "$1" in --json) json=$2; shift ;; --rows) rows=$2; shift ;; esac
  shift
done
r=""; IFS=, read -ra items <<< "$rows"
for it in "${{items[@]}}"; do
  IFS=: read -r st mo pr <<< "$it"
  r="$r${{r:+,}}{{\"stage\": \"$st\", \"batching\": \"padded\", \"mode\": \"$mo\", \"precision\": \"$pr\", \"samples_per_s\": 50000.0, \"ms_per_step\": 20.48, \"tflops\": 11.0, \"peak_mem_bytes\": 2097152}}"
done
echo "{{\"engine\": \"pytorch\", \"device\": \"stand-in\", \"results\": [$r]}}" > "$json""#
        ),
    );
    // ncu: writes a two-kernel CSV (`--page raw`'s layout) where --log-file says.
    script(
        &tools.join("ncu"),
        &format!(
            r#"{record}
while [ $# -gt 0 ]; do [ "$1" = --log-file ] && {{ csv=$2; break; }}; shift; done
printf '%s\n' '"ID","Kernel Name","gpu__time_duration.sum"' '"","","nsecond"' \
  '"0","gelu_f32","2000"' '"1","layernorm_f32","1000"' > "$csv""#
        ),
    );
    script(
        &tools.join("nvidia-smi"),
        "echo 'name, driver_version'; echo 'stand-in GPU, 0'",
    );
    (bin, tools)
}

/// Runs tools/gpu-check with the stand-ins, `OUT` and logs in `dir`, and `env` on top.
fn gpu_check(dir: &Path, bin: &Path, tools: &Path, env: &[(&str, &str)]) -> Output {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = dir.join("out");
    fs::create_dir_all(&out).expect("OUT dir");
    let path = format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut cmd = Command::new("bash");
    cmd.arg(root.join("tools/gpu-check"))
        .env("PATH", path)
        .env("OUT", &out)
        .env("GPU_CHECK_LOGS", dir.join("logs"))
        .env("GPU_CHECK_BIN", bin)
        .env("GPU_CHECK_PYTHON", tools.join("python-with-torch"))
        .env_remove("GPU_CHECK_BUDGET")
        .env_remove("GPU_CHECK_SKIP")
        .env_remove("GPU_CHECK_TIMEOUT")
        .env_remove("MGKD_KERNEL_CACHE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("bash runs tools/gpu-check")
}

/// The step table's rows (name, result), from summary.txt.
fn step_rows(summary: &str) -> Vec<(String, String)> {
    summary
        .lines()
        .skip_while(|l| !l.starts_with("step "))
        .skip(1)
        .take_while(|l| !l.starts_with("total:"))
        .map(|l| {
            // Columns are two spaces apart; a name holds single spaces only.
            let (name, rest) = l.split_once("  ").unwrap_or((l, ""));
            let result = rest.trim().split_once("  ").map(|(_, r)| r).unwrap_or("");
            (name.trim().to_string(), result.trim().to_string())
        })
        .collect()
}

fn result_of<'a>(rows: &'a [(String, String)], name: &str) -> &'a str {
    rows.iter()
        .find(|(n, _)| n.starts_with(name))
        .map(|(_, r)| r.as_str())
        .unwrap_or_else(|| panic!("no step '{name}' in {rows:#?}"))
}

#[test]
fn every_step_is_run_in_order_named_with_its_outcome_and_its_logs_come_back() {
    let dir = scratch("run");
    let (bin, tools) = stand_ins(
        &dir,
        &[
            (
                "cuda_model_parity",
                "echo 'test result: FAILED. 1 passed; 1 failed'; exit 3",
            ),
            ("cuda_train", "sleep 100"),
        ],
    );
    let out = gpu_check(
        &dir,
        &bin,
        &tools,
        &[
            ("GPU_CHECK_TIMEOUT", "3"),
            ("GPU_CHECK_SKIP", "train quality dist"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");

    // Exactly the two files a device call should bring back.
    let mut returned: Vec<String> = fs::read_dir(dir.join("out"))
        .expect("OUT readable")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    returned.sort();
    assert_eq!(returned, ["gpu-logs.tar.gz", "summary.txt"]);
    let listing = Command::new("tar")
        .arg("-tzf")
        .arg(dir.join("out/gpu-logs.tar.gz"))
        .output()
        .expect("tar runs");
    let listing = String::from_utf8_lossy(&listing.stdout).into_owned();
    for f in [
        "tests.log",
        "mtests.log",
        "ttests.log",
        "bench_engine.json",
        "bench_bf16_fused.json",
        "bench_torch.json",
        "bench_torch_more.json",
        "ncu.csv",
        "ncu_summary.txt",
        "summary.txt",
        "device.txt",
    ] {
        assert!(listing.contains(f), "{f} not in the archive:\n{listing}");
    }

    // Each step's outcome, in the documented order.
    let summary = fs::read_to_string(dir.join("out/summary.txt")).expect("summary.txt");
    assert!(
        stdout.ends_with(&summary),
        "the output ends with the summary"
    );
    let rows = step_rows(&summary);
    let names: Vec<&str> = rows.iter().map(|(n, _)| n.as_str()).collect();
    let order = [
        "build (release)",
        "mgkd-train devices --require cuda",
        "CUDA parity tests",
        "CUDA whole-model parity tests",
        "bench: f32 eager",
        "bench: f32 graphs",
        "bench: bf16 eager and graphs",
        "bench: PyTorch twin, the targets' anchors (tools/torch_twin.py)",
        "profile: ncu, one f32 student step",
        "CUDA training (graphs vs eager, resume)",
        "CUDA bf16 parity (against the CPU reference and f64)",
        "CUDA bf16 parity, op by op",
        "bench: f32 graphs, fused attention",
        "bench: bf16 graphs, fused (tensor-core) attention",
        "profile: ncu, one bf16 student step, fused attention",
        "CUDA whole-model parity, fused attention",
        "bench: PyTorch twin, the other rows",
        "CUDA activation arena",
        "teacher cache (CPU exactness, GPU graphs)",
        "kernel check (NVRTC)",
        "CUDA microbenchmarks",
        "profile: ncu, one bf16 student step",
    ];
    assert_eq!(names, order, "{summary}");
    assert!(result_of(&rows, "build (release)").starts_with("prebuilt"));
    assert_eq!(result_of(&rows, "CUDA parity tests"), "ok");
    assert_eq!(
        result_of(&rows, "CUDA whole-model parity tests"),
        "FAILED (rc=3, mtests.log)"
    );
    assert_eq!(
        result_of(&rows, "CUDA training"),
        "TIMED OUT after 3 s (ttests.log)"
    );
    assert_eq!(
        result_of(&rows, "CUDA whole-model parity, fused"),
        "FAILED (rc=3, ftests.log)"
    );
    for (name, result) in &rows[4..] {
        if !name.starts_with("CUDA training") && !name.starts_with("CUDA whole-model parity") {
            assert_eq!(result, "ok", "{name}");
        }
    }

    // The tables: the ncu summary, the tests' lines, the bench table with both engines.
    assert!(summary.contains("gelu_f32"), "{summary}");
    assert!(
        summary.contains("mtests.log: test result: FAILED. 1 passed; 1 failed"),
        "{summary}"
    );
    assert!(summary.contains("engine ÷ this"), "{summary}");
    assert!(
        summary.contains("pytorch") && summary.contains("mgkd"),
        "{summary}"
    );

    // How the stand-ins were called.
    let calls = fs::read_to_string(dir.join("calls.log")).expect("calls.log");
    let cache = bin.join("kernel-cache");
    let called = |prefix: &str, env: &str| {
        calls
            .lines()
            .any(|l| l.starts_with(prefix) && l.ends_with(env))
    };
    let plain = format!("| 1  {}", cache.display());
    let fused = format!("| 1 fused {}", cache.display());
    assert!(
        called("cuda_parity --nocapture --test-threads=1", &plain),
        "{calls}"
    );
    assert!(
        called("mgkd-train bench --device cuda --modes eager", &plain),
        "{calls}"
    );
    assert!(
        called(
            "mgkd-train bench --device cuda --precision bf16 --modes eager,graphs",
            &plain
        ),
        "{calls}"
    );
    assert!(
        called(
            "mgkd-train bench --device cuda --precision bf16 --modes graphs",
            &fused
        ),
        "{calls}"
    );
    assert!(
        called("cuda_model_parity --nocapture --test-threads=1", &fused),
        "{calls}"
    );
    let twin = "python-with-torch tools/torch_twin.py --device cuda --rows";
    let first = "student:eager:f32,student:graphs:f32,student:graphs:bf16,teacher:eager:f32,\
                 teacher:graphs:bf16 ";
    assert!(called(&format!("{twin} {first}"), &plain), "{calls}");
    assert!(
        called(&format!("{twin} teacher:graphs:f32,"), &plain),
        "{calls}"
    );
    // Both twin files in the table: 12 PyTorch rows, each once.
    assert_eq!(summary.matches("  pytorch ").count(), 12, "{summary}");
    assert!(called("ncu --clock-control none", &fused), "{calls}");
    fs::remove_dir_all(&dir).expect("scratch removable");
}

#[test]
fn a_spent_budget_stops_new_steps_and_says_so() {
    let dir = scratch("budget");
    let (bin, tools) = stand_ins(&dir, &[("cuda_parity", "sleep 1000")]);
    // 40 s, 15 of them kept for the tables: the hanging parity step gets the other 25, and
    // no later step has the 15 s it needs to start.
    let out = gpu_check(&dir, &bin, &tools, &[("GPU_CHECK_BUDGET", "40")]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let summary = fs::read_to_string(dir.join("out/summary.txt")).expect("summary.txt");
    let rows = step_rows(&summary);
    assert_eq!(result_of(&rows, "mgkd-train devices"), "ok");
    // The budget left when it started, less the 15 s kept: 25 s less what the steps before it
    // took (well under a second here; a slow machine may take a few).
    let parity = result_of(&rows, "CUDA parity tests");
    let limit: u64 = parity
        .strip_prefix("TIMED OUT after ")
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{parity}"));
    assert!((15..=25).contains(&limit), "{parity}");
    let after: Vec<&(String, String)> = rows
        .iter()
        .skip_while(|(n, _)| !n.starts_with("CUDA parity tests"))
        .skip(1)
        .collect();
    assert!(after.len() > 10, "{summary}");
    for (name, result) in after {
        assert!(result.starts_with("not run (budget:"), "{name}: {result}");
    }
    assert!(summary.contains("of a 40 s budget"), "{summary}");
    fs::remove_dir_all(&dir).expect("scratch removable");
}
