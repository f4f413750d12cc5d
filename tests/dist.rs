//! Data-parallel training without GPUs: the collectives over real TCP connections (and the
//! failures they must report by rank), the division of a split among ranks, and the
//! invariant that N ranks on batches of B/N rows train the parameters one process trains on
//! batches of B rows (CPU f64 to 1e-12, f32 to 1e-6), teacher and student, with only rank 0
//! writing. On a GPU (skipped without one, or without NCCL): the same invariant through
//! real NCCL, a job of one rank included.

mod skip;
mod train_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::cuda::CudaBackend;
use mgkd::backend::device::cuda_device_count;
use mgkd::backend::{Backend, Float, Mut};
use mgkd::data::Dataset;
use mgkd::dist::{nccl, owned_rows, Comm};
use mgkd::loss::LossConfig;
use mgkd::model::{Model, ModelConfig, Role, Teacher};
use mgkd::train::{train, train_distributed, RunOptions, Stage, TrainConfig, TrainReport, VALID};
use train_common::Spec;

/// A free TCP port on this machine (bound, then released).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("bind");
    l.local_addr().expect("addr").port()
}

/// Runs `f(rank)` for every rank of a TCP job of `world` on localhost, each rank in its
/// own thread with its own rendezvous; returns the results in rank order.
fn tcp_job<T: Send>(
    world: usize,
    timeout: Duration,
    f: impl Fn(mgkd::Result<Comm>) -> T + Sync,
) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let f = &f;
                s.spawn(move || {
                    let wait = Duration::from_secs(20);
                    f(Comm::rendezvous(
                        rank,
                        world,
                        "127.0.0.1",
                        port,
                        wait,
                        timeout,
                    ))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    })
}

#[test]
fn tcp_collectives_give_every_rank_the_same_bits() {
    let out = tcp_job(3, Duration::from_secs(30), |comm| {
        let comm = comm.expect("rendezvous");
        let r = comm.rank() as f32;
        // Poison-free, rank-dependent values whose f32 sum depends on the order of addition.
        let mut x = vec![0.1 + r, 1e8 * (r - 1.0), -3.5 * r, 1.0 / (r + 3.0)];
        comm.all_reduce_sum(&mut x).expect("all-reduce");
        let gathered = comm
            .all_gather(&vec![comm.rank() as f64; comm.rank() + 1])
            .expect("gather");
        let b = comm.broadcast(&[comm.rank() as u8 + 7]).expect("broadcast");
        comm.barrier().expect("barrier");
        (x, gathered, b)
    });
    let want: Vec<f32> = {
        let v = |r: f32| [0.1 + r, 1e8 * (r - 1.0), -3.5 * r, 1.0 / (r + 3.0)];
        let (a, b, c) = (v(0.0), v(1.0), v(2.0));
        (0..4).map(|i| (a[i] + b[i]) + c[i]).collect()
    };
    for (rank, (x, gathered, b)) in out.iter().enumerate() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(x), bits(&want), "rank {rank}: sum in rank order");
        assert_eq!(
            gathered,
            &vec![vec![0.0], vec![1.0, 1.0], vec![2.0, 2.0, 2.0]],
            "rank {rank}"
        );
        assert_eq!(b, &vec![7u8], "rank {rank}: rank 0's value");
    }
}

#[test]
fn a_missing_rank_is_named_at_the_rendezvous() {
    let port = free_port();
    let e = Comm::rendezvous(
        0,
        3,
        "127.0.0.1",
        port,
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
    .expect_err("ranks 1 and 2 never come");
    let msg = e.to_string();
    assert!(msg.contains("ranks 1, 2 did not arrive"), "{msg}");
    // A rank whose rank 0 never listens says where it looked.
    let e = Comm::rendezvous(
        1,
        2,
        "127.0.0.1",
        port,
        Duration::from_secs(1),
        Duration::from_secs(5),
    )
    .expect_err("nobody listens");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!(
            "rank 1 could not reach rank 0 at 127.0.0.1:{port}"
        )),
        "{msg}"
    );
}

/// Another service on the rendezvous port (as torchrun's store on `MASTER_PORT`): rank 0
/// cannot listen there, and a rank that reaches it is told it is not rank 0; both errors say
/// how to choose another port. A rank launched with another world size is refused by name.
#[test]
fn a_stranger_on_the_port_and_a_mismatched_rank_are_explained() {
    use std::io::{Read, Write};
    let stranger = std::net::TcpListener::bind(("0.0.0.0", 0)).expect("bind");
    let port = stranger.local_addr().expect("addr").port();
    let wait = Duration::from_secs(5);
    let e = Comm::rendezvous(0, 2, "127.0.0.1", port, wait, wait)
        .expect_err("the port is taken")
        .to_string();
    assert!(
        e.contains(&format!("cannot listen on port {port}")) && e.contains("MGKD_RENDEZVOUS_PORT"),
        "{e}"
    );
    let answer = std::thread::spawn(move || {
        let (mut c, _) = stranger.accept().expect("accept");
        let mut greeting = [0u8; 16];
        c.read_exact(&mut greeting).expect("greeting");
        // A store's reply: not rank 0's answer (and no frame length to trust).
        c.write_all(&[0xff; 17]).expect("reply");
    });
    let e = Comm::rendezvous(1, 2, "127.0.0.1", port, wait, wait)
        .expect_err("a stranger")
        .to_string();
    answer.join().expect("stranger");
    assert!(
        e.contains("is not mgkd-train's rank 0") && e.contains("MGKD_RENDEZVOUS_PORT"),
        "{e}"
    );
    // Rank 1 launched with a world of 3 against rank 0's 2: both say so.
    let port = free_port();
    let out: Vec<String> = std::thread::scope(|s| {
        let r0 = s.spawn(|| Comm::rendezvous(0, 2, "127.0.0.1", port, wait, wait).map(|_| ()));
        let r1 = s.spawn(|| Comm::rendezvous(1, 3, "127.0.0.1", port, wait, wait).map(|_| ()));
        [r0, r1]
            .map(|h| h.join().expect("rank").expect_err("mismatch").to_string())
            .into()
    });
    for e in &out {
        assert!(
            e.contains("rank 1 was launched with a world size of 3, rank 0 with 2"),
            "{e}"
        );
    }
    assert!(out[1].contains("refused this rank"), "{}", out[1]);
}

/// Connections that are not ranks (a port scan that closes at once, a client that sends
/// something else) are dropped by rank 0, and the rendezvous goes on to completion.
#[test]
fn strangers_at_the_rendezvous_are_dropped_and_the_ranks_still_meet() {
    use std::io::{Read, Write};
    let port = free_port();
    let wait = Duration::from_secs(20);
    let joined: Vec<usize> = std::thread::scope(|s| {
        let r0 = s.spawn(|| Comm::rendezvous(0, 2, "127.0.0.1", port, wait, wait));
        // Strangers first, while rank 0 listens (retried until it does).
        let connect = || loop {
            match std::net::TcpStream::connect(("127.0.0.1", port)) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        drop(connect());
        let mut http = connect();
        http.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        let mut reply = Vec::new();
        let _ = http.read_to_end(&mut reply);
        assert!(
            String::from_utf8_lossy(&reply).contains("not an mgkd-train rank"),
            "the stranger is told why: {reply:?}"
        );
        let r1 = s.spawn(|| Comm::rendezvous(1, 2, "127.0.0.1", port, wait, wait));
        [r0, r1]
            .map(|h| h.join().expect("rank").expect("rendezvous").rank())
            .into()
    });
    assert_eq!(joined, [0, 1]);
}

/// Ranks on different kinds of device cannot meet in a collective: every rank stops at
/// `attach`, naming the rank that differs.
#[test]
fn ranks_on_different_devices_are_refused() {
    let comms = Comm::local_group(3, Duration::from_secs(30));
    let errors: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let attached = match comm.rank() {
                        2 => comm.attach(&CpuBackend::<f64>::new()).map(|_| ()),
                        _ => comm.attach(&CpuBackend::<f32>::new()).map(|_| ()),
                    };
                    attached.expect_err("mixed devices").to_string()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    });
    for e in errors {
        assert!(
            e.contains("rank 2 runs on cpu-f64 and rank 0 on cpu-f32"),
            "{e}"
        );
    }
}

/// A rank whose sum has another length (another model) stops every rank, named.
#[test]
fn a_sum_of_another_length_is_refused_by_every_rank() {
    let out = tcp_job(2, Duration::from_secs(30), |comm| {
        let comm = comm.expect("rendezvous");
        let mut x = vec![1.0f32; 3 - comm.rank()];
        comm.all_reduce_sum(&mut x)
            .expect_err("lengths differ")
            .to_string()
    });
    for msg in &out {
        assert!(
            msg.contains("rank 1 contributed 8 bytes to a sum of 3 values of 4 bytes"),
            "{msg}"
        );
    }
}

#[test]
fn a_failing_rank_is_named_by_every_other_rank() {
    let out = tcp_job(3, Duration::from_secs(30), |comm| {
        let comm = comm.expect("rendezvous");
        if comm.rank() == 2 {
            comm.abort("the shard train-0003 is corrupt");
            return String::new();
        }
        let mut x = vec![1.0f64];
        comm.all_reduce_sum(&mut x)
            .expect_err("rank 2 failed")
            .to_string()
    });
    for msg in &out[..2] {
        assert!(
            msg.contains("rank 2 failed: the shard train-0003 is corrupt"),
            "{msg}"
        );
    }
}

#[test]
fn a_vanished_or_silent_rank_is_named() {
    // Rank 1 returns (its connection closes) without a word.
    let out = tcp_job(3, Duration::from_secs(30), |comm| {
        let comm = comm.expect("rendezvous");
        if comm.rank() == 1 {
            return String::new();
        }
        comm.barrier().expect_err("rank 1 is gone").to_string()
    });
    for msg in [&out[0], &out[2]] {
        assert!(msg.contains("rank 1 stopped without a word"), "{msg}");
    }
    // Rank 2 stays silent past the watchdog timeout.
    let out = tcp_job(3, Duration::from_secs(1), |comm| {
        let comm = comm.expect("rendezvous");
        if comm.rank() == 2 {
            std::thread::sleep(Duration::from_secs(4));
            return String::new();
        }
        comm.barrier().expect_err("rank 2 is silent").to_string()
    });
    for msg in &out[..2] {
        assert!(msg.contains("rank 2 sent nothing for 1 s"), "{msg}");
    }
}

/// The test dataset: 300 rows in shards of 97 (4 shards; every split has rows in each).
fn dataset(dir: &Path) -> Dataset {
    train_common::write(dir, Spec::labelled(300, 11));
    Dataset::open(dir).expect("open")
}

#[test]
fn each_rank_scores_its_own_shards_or_a_row_range() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = dataset(tmp.path());
    let train_rows = ds.rows_of_split(0);
    let valid_rows = ds.rows_of_split(VALID);
    // Train spans shards 0–3: shards 0 and 1 go to rank 0, 2 and 3 to rank 1 (⌊j·2/4⌋).
    let shard = |i: usize| ds.locate(train_rows[i]).expect("row").0;
    let [r0, r1]: [Vec<usize>; 2] = owned_rows(&ds, &train_rows, 2).try_into().expect("2 parts");
    assert!(!r0.is_empty() && !r1.is_empty());
    assert!(r0.iter().all(|&i| shard(i) < 2) && r1.iter().all(|&i| shard(i) >= 2));
    assert_eq!([r0, r1].concat(), (0..train_rows.len()).collect::<Vec<_>>());
    // Valid (45 rows) spans the 4 shards too; with 5 ranks, more than its shards, each rank
    // gets a near-equal row range.
    let parts = owned_rows(&ds, &valid_rows, 5);
    assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![9; 5]);
    assert_eq!(parts.concat(), (0..valid_rows.len()).collect::<Vec<_>>());
}

/// Trains a teacher, then a student under it (the spec's starting coefficients: every term
/// at a sizeable weight), with `world` ranks in threads (0: one process outside any job),
/// rank k on `make(k)` joined to the job ([`Comm::attach`]: NCCL on CUDA); returns each
/// rank's reports and final parameters (as f64).
fn train_job<B: Backend>(
    make: impl Fn(usize) -> B + Sync,
    ds: &Dataset,
    world: usize,
    tc: &TrainConfig,
    opts: impl Fn(usize, Role) -> RunOptions + Sync,
) -> Vec<([TrainReport; 2], [Vec<f64>; 2])> {
    let loss = LossConfig::spec_starting();
    let widths = |role| ModelConfig::new(role, ds.schema(), 8, 2, 2, 4).expect("config");
    let comms = if world == 0 {
        vec![Comm::solo()]
    } else {
        Comm::local_group(world, Duration::from_secs(120))
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                let (make, opts, loss, widths) = (&make, &opts, &loss, &widths);
                s.spawn(move || {
                    let be = make(comm.rank());
                    let _attached = comm.attach(&be).expect("attach");
                    let run = |model: &mut Model<B>, stage: &Stage<'_, B>, role| {
                        let o = opts(comm.rank(), role);
                        if comm.joined() {
                            train_distributed(&be, ds, model, stage, loss, tc, &o, &comm)
                        } else {
                            train(&be, ds, model, stage, loss, tc, &o)
                        }
                        .expect("train")
                    };
                    let values = |m: &Model<B>| -> Vec<f64> {
                        let v = be.download(&m.params.values).expect("download");
                        v.iter().map(|x| x.to_f64()).collect()
                    };
                    let mut teacher = Model::new(&be, widths(Role::Teacher), 1).expect("model");
                    let t = run(&mut teacher, &Stage::Teacher, Role::Teacher);
                    let mut student = Model::new(&be, widths(Role::Student), 2).expect("model");
                    let stage = Stage::Student(Teacher::live(&teacher));
                    let st = run(&mut student, &stage, Role::Student);
                    ([t, st], [values(&teacher), values(&student)])
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank"))
            .collect()
    })
}

/// `‖a − b‖₂ / ‖b‖₂` over the elements not in `skip` (the measure of the backends' parity
/// tests), and the largest `|a − b|` among the elements in `skip`.
fn rel_diff(a: &[f64], b: &[f64], skip: &[bool]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den, mut skipped) = (0.0, 0.0, 0.0f64);
    for i in 0..a.len() {
        let d = a[i] - b[i];
        if skip[i] {
            skipped = skipped.max(d.abs());
        } else {
            num += d * d;
            den += b[i] * b[i];
        }
    }
    ((num / den).sqrt(), skipped)
}

/// The elements of `role`'s parameters whose gradient is 0 in exact arithmetic, at every
/// parameter value, and computed as rounding noise: the key biases of self-attention
/// (`attn.in_proj.bias[d..2d]`: adding a vector to every key adds the same amount to all
/// scores of a query, which the softmax ignores). Adam's normalisation turns the noise into
/// steps of up to the learning rate, so their values depend on the summation order (as in
/// `cuda_model_parity.rs`'s `null_elements`); in f64 the noise (1e-17) stays far below
/// Adam's ε and they do not move. `fine.k.bias` has the same invariance, but the fine loss
/// never forms its keys, so its gradient is exactly 0 and it is held like every parameter.
fn null_elements(ds: &Dataset, role: Role) -> (Vec<bool>, Vec<String>) {
    let cfg = ModelConfig::new(role, ds.schema(), 8, 2, 2, 4).expect("config");
    let table = mgkd::model::params::ParamTable::new(&cfg);
    let mut null = vec![false; table.total()];
    let mut names = Vec::new();
    for e in table.entries() {
        if e.name.ends_with("attn.in_proj.bias") {
            names.push(e.name.clone());
            null[e.offset + cfg.d..e.offset + 2 * cfg.d].fill(true);
        }
    }
    (null, names)
}

/// N ranks × B/N ≡ 1 × B for each N of `worlds`, rank k on backend `make(k)` (one process
/// on `make(0)`): the parameters within `tol` of one process's (`‖p_N − p_1‖₂/‖p_1‖₂`),
/// every rank's the same bits, a job of one rank one process's bits, and the validation AUC
/// and training loss of every epoch within `tol`. With `skip_null`, the elements of
/// [`null_elements`] are held only to what AdamW can move them in the run's steps (lr per
/// step).
fn ranks_match_one_process<B: Backend>(
    make: impl Fn(usize) -> B + Sync,
    worlds: &[usize],
    tol: f64,
    skip_null: bool,
) {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = dataset(tmp.path());
    // 210 train rows in batches of 26: the last batch has 2 rows, so with 3 and 4 ranks some
    // ranks run a stand-in row with a zero share. lr 1e-3, as in the backends' parity tests:
    // Adam turns the f32 rounding noise of small gradients into parameter differences that
    // grow with the step size (at 5e-3 the f32 runs differ by 2e-6 after 18 steps).
    let tc = TrainConfig {
        epochs: 2,
        batch: 26,
        lr: 1e-3,
        seed: 5,
        ..TrainConfig::default()
    };
    let quiet = |_: usize, _: Role| RunOptions::default();
    let one = train_job(&make, &ds, 0, &tc, quiet).remove(0);
    let mut largest = 0.0f64;
    // The runs moved the parameters far beyond `tol`: the bound checks something.
    for (k, role) in [Role::Teacher, Role::Student].into_iter().enumerate() {
        let be = make(0);
        let cfg = ModelConfig::new(role, ds.schema(), 8, 2, 2, 4).expect("config");
        let init = Model::new(&be, cfg, k as u64 + 1).expect("model");
        let init: Vec<f64> = be
            .download(&init.params.values)
            .expect("download")
            .iter()
            .map(|x| x.to_f64())
            .collect();
        let (moved, _) = rel_diff(&one.1[k], &init, &vec![false; init.len()]);
        assert!(
            moved > 1e-3,
            "{role}: training moved the parameters by only {moved:e}"
        );
    }
    let skip: Vec<Vec<bool>> = [Role::Teacher, Role::Student]
        .into_iter()
        .map(|role| {
            let (null, names) = null_elements(&ds, role);
            assert!(!names.is_empty(), "{role}: no null elements found");
            if skip_null {
                null
            } else {
                vec![false; null.len()]
            }
        })
        .collect();
    for &world in worlds {
        let ranks = train_job(&make, &ds, world, &tc, quiet);
        for (rank, (reports, values)) in ranks.iter().enumerate() {
            for (k, what) in ["teacher", "student"].iter().enumerate() {
                let (d, null_d) = rel_diff(&values[k], &one.1[k], &skip[k]);
                assert!(
                    d <= tol,
                    "{what}, {world} ranks, rank {rank}: parameters differ from one process by \
                     {d:e} relative"
                );
                largest = largest.max(d);
                let steps = one.0[k].history.last().expect("epochs").step as f64;
                assert!(
                    null_d <= 2.0 * tc.lr * steps,
                    "{what}: null elements moved {null_d}"
                );
                // A job of one runs the data-parallel path with shares of 1 and sums over
                // itself: one process's bits.
                if world == 1 {
                    assert!(
                        values[k] == one.1[k],
                        "{what}: a job of one differs from one process"
                    );
                }
                // Every rank holds the same parameters, bit for bit.
                assert!(
                    values[k] == ranks[0].1[k],
                    "{what}: rank {rank} differs from rank 0"
                );
                for (e, (a, b)) in reports[k].history.iter().zip(&one.0[k].history).enumerate() {
                    let (da, dl) = (
                        (a.valid_auc - b.valid_auc).abs(),
                        (a.train_loss - b.train_loss).abs(),
                    );
                    assert!(
                        da <= tol && dl <= tol * b.train_loss.abs().max(1.0),
                        "{what}, {world} ranks, rank {rank}, epoch {e}: valid AUC {} vs {}, \
                         train loss {} vs {}",
                        a.valid_auc,
                        b.valid_auc,
                        a.train_loss,
                        b.train_loss
                    );
                }
            }
        }
    }
    eprintln!("largest relative difference from one process: {largest:e} (bound {tol:e})");
}

#[test]
fn ranks_times_part_batches_equal_one_process_in_f64() {
    ranks_match_one_process(|_| CpuBackend::<f64>::new(), &[1, 2, 3, 4], 1e-12, false);
}

#[test]
fn ranks_times_part_batches_equal_one_process_in_f32() {
    ranks_match_one_process(|_| CpuBackend::<f32>::new(), &[1, 2, 3, 4], 1e-6, true);
}

/// How many GPUs the NCCL tests may use (at least `need`), or `None` after saying why they
/// skip; with `MGKD_REQUIRE_GPU=1` (tools/gpu-check) a missing GPU or NCCL fails instead
/// (fewer GPUs than `need` does not: the machine has what it has).
fn gpus_with_nccl(need: usize) -> Option<usize> {
    let why = match (cuda_device_count(), nccl::version()) {
        (Ok(n), Ok(_)) if n >= need => return Some(n),
        (Ok(n), Ok(_)) if n > 0 => {
            skip::skip(&format!("{n} GPU(s) here, the test needs {need}"));
            return None;
        }
        (Ok(_), Ok(_)) => "no CUDA device".to_string(),
        (Err(e), _) => format!("no usable CUDA device ({e})"),
        (_, Err(e)) => format!("no NCCL ({e})"),
    };
    if std::env::var("MGKD_REQUIRE_GPU").as_deref() == Ok("1") {
        panic!("MGKD_REQUIRE_GPU=1 but {why}");
    }
    skip::skip(&format!("{why}; on a GPU machine: tools/gpu-check"));
    None
}

/// The NCCL binding against the real library (no GPU needed; `.ci/run` installs the
/// `nvidia-nccl-cu13` wheel and sets `MGKD_NCCL_LIB`): every entry point resolves, the
/// version reads, unique ids are made and differ, and a communicator that cannot start (no
/// GPU here) is an error naming NCCL and its reason, not a crash.
#[test]
fn nccl_binding_loads_and_reports_failures() {
    let version = match nccl::version() {
        Ok(v) => v,
        Err(e) => {
            skip::skip_unless_ci(&format!("{e}"));
            return;
        }
    };
    // 2.9 and later: major·10000 + minor·100 + patch.
    assert!(
        (20900..100000).contains(&version),
        "NCCL version code {version}"
    );
    let (a, b) = (
        nccl::unique_id().expect("id"),
        nccl::unique_id().expect("id"),
    );
    assert!(a.internal.iter().any(|&c| c != 0), "an all-zero unique id");
    assert!(a.internal != b.internal, "two unique ids are the same");
    if cuda_device_count().unwrap_or(0) == 0 {
        let e = nccl::NcclComm::init(0, 1, a)
            .expect_err("a communicator without a GPU")
            .to_string();
        assert!(
            e.contains("NCCL init") && e.len() > "NCCL init: ".len() + 8,
            "{e}"
        );
        eprintln!("NCCL {version} without a GPU: {e}");
    }
}

/// NCCL itself, on every GPU here (up to 4 ranks, one thread and device each): attached to
/// a job, the backend's all-reduce is NCCL's (recordable into graphs) and sums in place:
/// integer-valued f32, so the sum is exact in any order.
#[test]
fn nccl_all_reduce_sums_over_the_gpus() {
    let Some(gpus) = gpus_with_nccl(1) else {
        return;
    };
    let world = gpus.min(4);
    let n = 1000;
    let value = |rank: usize, i: usize| ((rank + 1) * (i % 97)) as f32 - 40.0;
    let comms = Comm::local_group(world, Duration::from_secs(120));
    std::thread::scope(|s| {
        for comm in comms {
            s.spawn(move || {
                let be = CudaBackend::new(comm.rank()).expect("cuda");
                let _attached = comm.attach(&be).expect("attach NCCL");
                assert!(be.all_reduce_in_graphs(&comm), "NCCL is not attached");
                let host: Vec<f32> = (0..n).map(|i| value(comm.rank(), i)).collect();
                let mut buf = be.upload(&host).expect("upload");
                // The window leaves the first element alone.
                be.all_reduce_sum(&comm, n - 1, Mut::at(&mut buf, 1))
                    .expect("all-reduce");
                let got = be.download(&buf).expect("download");
                assert_eq!(got[0], host[0], "rank {}: outside the window", comm.rank());
                for (i, &g) in got.iter().enumerate().skip(1) {
                    let want: f32 = (0..world).map(|r| value(r, i)).sum();
                    assert_eq!(g, want, "rank {}, element {i}", comm.rank());
                }
            });
        }
    });
}

/// World size 1 through real NCCL: one process's bits. With more GPUs, 2 to 4 ranks (one
/// GPU each) within 1e-6 of one GPU process, the f32 bound of the CPU test.
#[test]
fn ranks_through_nccl_equal_one_gpu_process() {
    let Some(gpus) = gpus_with_nccl(1) else {
        return;
    };
    let worlds: Vec<usize> = (1..=gpus.min(4)).collect();
    eprintln!("ranks through NCCL: {worlds:?}");
    ranks_match_one_process(
        |rank| CudaBackend::new(rank).expect("cuda"),
        &worlds,
        1e-6,
        true,
    );
}

#[test]
fn only_rank_zero_writes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let ds = dataset(&tmp.path().join("data"));
    // 27 steps an epoch: past a LOG_INTERVAL (25) boundary, where rank 0's resume
    // checkpoint every 2 steps falls due; rank 1's own (different) interval plays no part.
    let tc = TrainConfig {
        epochs: 1,
        batch: 8,
        seed: 5,
        ..TrainConfig::default()
    };
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).expect("mkdir");
    let path = |rank: usize, role: Role, what: &str| -> PathBuf {
        out.join(format!("rank{rank}-{role}.{what}"))
    };
    let opts = |rank: usize, role: Role| RunOptions {
        checkpoint: Some(path(rank, role, "safetensors")),
        log: Some(path(rank, role, "jsonl")),
        resume: Some(mgkd::train::resume::ResumeOptions {
            path: path(rank, role, "resume"),
            every: match rank {
                0 => mgkd::train::resume::Every::Steps(2),
                _ => mgkd::train::resume::Every::Seconds(3600),
            },
            resume: false,
        }),
        ..RunOptions::default()
    };
    train_job(|_| CpuBackend::<f32>::new(), &ds, 2, &tc, opts);
    let mut written: Vec<String> = std::fs::read_dir(&out)
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(
        written,
        vec![
            "rank0-student.jsonl",
            "rank0-student.safetensors",
            "rank0-teacher.jsonl",
            "rank0-teacher.safetensors",
        ]
    );
}
