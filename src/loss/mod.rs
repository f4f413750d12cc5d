//! The objectives of docs/model.md §5: class weights, the teacher stage (weighted BCE) and the
//! student stage `L = L_hard + α·L_soft + β·L_coarse + γ·L_fine + δ·L_self` with every term
//! switchable. Each objective runs the forward passes, the backend's fused loss ops and the
//! student's (or teacher's) backward; the frozen teacher of the student stage only runs
//! forward and is borrowed immutably, so nothing of it can be written.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, FineGrads, FineShape, Float, Mut, Ref};
use crate::model::layers::{one, uninit, uninit_full, zero, zeros, zeros_full};
use crate::model::{DeviceBatch, Model, OutputGrads, Role, Teacher};
use crate::{Error, Result};

fn yes() -> bool {
    true
}

/// Coefficients and switches of the student-stage objective (docs/model.md §5.8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    /// α, weight of L_soft.
    pub alpha: f64,
    /// β, weight of L_coarse.
    pub beta: f64,
    /// γ, weight of L_fine.
    pub gamma: f64,
    /// δ, weight of L_self.
    pub delta: f64,
    /// Temperature τ of L_soft and L_self.
    pub tau: f64,
    /// Re-weighting exponent ρ ∈ [0, 1].
    pub rho: f64,
    /// L_hard on (default; off only for analysis such as a term-alone gradient check).
    #[serde(default = "yes")]
    pub hard: bool,
    /// L_soft on.
    pub soft: bool,
    /// L_coarse on.
    pub coarse: bool,
    /// L_fine on.
    pub fine: bool,
    /// L_self on (absent anyway with one block).
    pub self_distill: bool,
    /// Class re-weighting on (`w_i = 1` when off).
    pub reweight: bool,
    /// L_coarse uses the cosine distance instead of the scaled squared distance.
    pub coarse_cosine: bool,
}

impl Default for LossConfig {
    /// The coefficients chosen on synthetic data (docs/results.md): α = 2, β = 0.1, γ = 0.1,
    /// δ = 0.1, τ = 1, ρ = 0.5 (the starting point before tuning was α = β = γ = 1, δ = 0.5,
    /// τ = 2); every term and re-weighting on, MSE form of L_coarse.
    fn default() -> Self {
        LossConfig {
            alpha: 2.0,
            beta: 0.1,
            gamma: 0.1,
            delta: 0.1,
            tau: 1.0,
            rho: 0.5,
            hard: true,
            soft: true,
            coarse: true,
            fine: true,
            self_distill: true,
            reweight: true,
            coarse_cosine: false,
        }
    }
}

impl LossConfig {
    /// The starting coefficients of docs/model.md §5.8, α = β = γ = 1, δ = 0.5, τ = 2, with every
    /// term and re-weighting on: every term at a sizeable weight, as the gradient and parity checks
    /// want (the tuned [`Default`] weighs the representation terms at 0.1).
    pub fn spec_starting() -> Self {
        LossConfig {
            alpha: 1.0,
            beta: 1.0,
            gamma: 1.0,
            delta: 0.5,
            tau: 2.0,
            ..LossConfig::default()
        }
    }

    /// Checks the coefficients: finite and ≥ 0, τ > 0, ρ ∈ [0, 1].
    pub fn validate(&self) -> Result<()> {
        let coefs = [
            ("alpha", self.alpha),
            ("beta", self.beta),
            ("gamma", self.gamma),
            ("delta", self.delta),
        ];
        for (name, v) in coefs {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(format!(
                    "loss config: {name} = {v} must be ≥ 0"
                )));
            }
        }
        if !(self.tau.is_finite() && self.tau > 0.0) {
            return Err(Error::invalid(format!(
                "loss config: tau = {} must be > 0",
                self.tau
            )));
        }
        if !(0.0..=1.0).contains(&self.rho) {
            return Err(Error::invalid(format!(
                "loss config: rho = {} must be in [0, 1]",
                self.rho
            )));
        }
        Ok(())
    }
}

/// Class weights `[w_0, w_1]` from the train split's counts (docs/model.md §5.1):
/// `w_c = (N/(2·N_c))^ρ`, then divided by `(N_0·w_0 + N_1·w_1)/N` so that they average 1
/// over the train split; `[1, 1]` when `reweight` is off. A class absent from the train
/// split (`N_c = 0`) keeps the raw weight 1; it does not enter the normalisation.
pub fn class_weights(n_neg: u64, n_pos: u64, rho: f64, reweight: bool) -> Result<[f64; 2]> {
    if !reweight {
        return Ok([1.0, 1.0]);
    }
    let n = n_neg + n_pos;
    if n == 0 {
        return Err(Error::invalid("class weights: the train split has no rows"));
    }
    let raw = |c: u64| {
        if c == 0 {
            1.0
        } else {
            (n as f64 / (2.0 * c as f64)).powf(rho)
        }
    };
    let w = [raw(n_neg), raw(n_pos)];
    let mean = (n_neg as f64 * w[0] + n_pos as f64 * w[1]) / n as f64;
    Ok([w[0] / mean, w[1] / mean])
}

/// Per-row weights `w_i = w_{y_i}` and labels of a batch (error when it has none).
fn row_weights<'a, B: Backend>(
    be: &B,
    batch: &'a DeviceBatch<B>,
    cw: [f64; 2],
) -> Result<(B::Buf, &'a B::Buf)> {
    let Some(labels) = &batch.labels else {
        return Err(Error::invalid("training needs labels; the batch has none"));
    };
    // On the device, no upload: w = w_0, then w −= w_0·y (exactly 0 where y = 1), then
    // w += w_1·y; labels are 0/1, so each row gets exactly w_0 or w_1.
    let n = batch.rows;
    let f = <B::F as Float>::from_f64;
    let mut w = zeros_full(be, n)?;
    be.fill(n, f(cw[0]), Mut::whole(&mut w));
    be.axpy(n, f(-cw[0]), Ref::whole(labels), Mut::whole(&mut w));
    be.axpy(n, f(cw[1]), Ref::whole(labels), Mut::whole(&mut w));
    Ok((w, labels))
}

/// `w` scaled by element `k` of a data-parallel `share` (device `[rows, fine]`, see
/// [`crate::dist::BatchShare`]); `None` without one (the weights count as they are).
fn share_scaled<B: Backend>(
    be: &B,
    n: usize,
    w: &B::Buf,
    share: Option<Ref<B::Buf>>,
    k: usize,
) -> Result<Option<B::Buf>> {
    share
        .map(|s| scaled(be, n, Ref::whole(w), Ref::at(s.buf, s.off + k)))
        .transpose()
}

/// `x[i]·s` for `n` elements of `x` and the device scalar `s` (an `n×1` by `1×1` product:
/// one rounding per element, no host round trip, so a recorded step reads the current `s`).
fn scaled<B: Backend>(be: &B, n: usize, x: Ref<B::Buf>, s: Ref<B::Buf>) -> Result<B::Buf> {
    let mut y = uninit_full(be, n)?;
    let g = crate::backend::Gemm::new(n, 1, 1, false, false);
    be.gemm(&g, one::<B::F>(), x, s, zero::<B::F>(), Mut::whole(&mut y));
    Ok(y)
}

/// Teacher stage `L_T = mean_i w_i·BCE(y_i, σ(z_t,i))`. With `backward`, accumulates
/// ∂L_T/∂θ into the teacher's gradient buffer. Returns `L_T` (waits for the device; see
/// [`teacher_objective_queued`]).
pub fn teacher_objective<B: Backend>(
    be: &B,
    class_w: [f64; 2],
    teacher: &mut Model<B>,
    batch: &DeviceBatch<B>,
    backward: bool,
) -> Result<f64> {
    let mut out = zeros_full(be, 1)?;
    let o = Mut::whole(&mut out);
    teacher_objective_queued(be, class_w, None, teacher, batch, backward, o)?;
    Ok(be.download(&out)?[0].to_f64())
}

/// [`teacher_objective`] without waiting: `L_T` is stored at `out[0]` on the device. With a
/// data-parallel `share` (device `[rows, fine]`), this rank's part of the batch counts for
/// its share of the global batch's mean ([`crate::dist::BatchShare`]).
pub fn teacher_objective_queued<B: Backend>(
    be: &B,
    class_w: [f64; 2],
    share: Option<Ref<B::Buf>>,
    teacher: &mut Model<B>,
    batch: &DeviceBatch<B>,
    backward: bool,
    out: Mut<B::Buf>,
) -> Result<()> {
    let n = batch.rows;
    let (raw, labels) = row_weights(be, batch, class_w)?;
    let scaled_w = share_scaled(be, n, &raw, share, 0)?;
    let w = scaled_w.as_ref().unwrap_or(&raw);
    let fwd = teacher.forward(be, batch)?;
    let mut dz = zeros_full(be, n)?;
    let dzm = backward.then(|| Mut::whole(&mut dz));
    let (z, y, wr) = (Ref::whole(&fwd.logits), Ref::whole(labels), Ref::whole(w));
    be.bce_loss_into(n, z, y, wr, one::<B::F>(), dzm, out)?;
    if backward {
        let g = OutputGrads {
            logits: dz,
            aux_logits: Vec::new(),
            hidden: None,
            tokens: None,
            p: None,
        };
        teacher.backward(be, batch, fwd, g)?;
    }
    Ok(())
}

/// The value of one student-stage term.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Term {
    /// Switched off in the [`LossConfig`].
    Off,
    /// Switched on but not defined for this model (L_self with one block).
    Absent,
    /// The term's value (before its coefficient).
    On(f64),
}

impl Term {
    /// The value, 0 when off or absent.
    pub fn value(self) -> f64 {
        match self {
            Term::On(v) => v,
            _ => 0.0,
        }
    }
}

/// Per-term values of the student stage and the total
/// `L = L_hard + α·L_soft + β·L_coarse + γ·L_fine + δ·L_self` (terms off or absent count 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StudentLoss {
    /// L_hard.
    pub hard: Term,
    /// L_soft.
    pub soft: Term,
    /// L_coarse.
    pub coarse: Term,
    /// L_fine.
    pub fine: Term,
    /// L_self.
    pub self_distill: Term,
    /// The weighted total.
    pub total: f64,
}

/// Where [`student_objective_queued`] stores a step's terms on the device, and how to read
/// them back: slot 0 L_hard, 1 L_soft, 2 L_coarse, 3 L_fine, then one slot per auxiliary head
/// (the head's KL; L_self is their mean). Slots of terms that are off are not written.
#[derive(Debug, Clone, PartialEq)]
pub struct StudentSlots {
    /// The loss configuration (switches and coefficients).
    pub cfg: LossConfig,
    /// Auxiliary heads of the student (blocks − 1).
    pub heads: usize,
}

/// Slot of L_hard.
pub const SLOT_HARD: usize = 0;
/// Slot of L_soft.
pub const SLOT_SOFT: usize = 1;
/// Slot of L_coarse.
pub const SLOT_COARSE: usize = 2;
/// Slot of L_fine.
pub const SLOT_FINE: usize = 3;
/// First slot of the auxiliary heads' KL terms (L_self).
pub const SLOT_SELF: usize = 4;

impl StudentSlots {
    /// The slots of `student` under `cfg`.
    pub fn new<B: Backend>(cfg: &LossConfig, student: &Model<B>) -> StudentSlots {
        StudentSlots {
            cfg: cfg.clone(),
            heads: student.layout.aux.len(),
        }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        SLOT_SELF + self.heads
    }

    /// Always false: there are at least the four fixed slots.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The terms and the total from the slot values `v` (`len()` of them).
    pub fn read(&self, v: &[f64]) -> StudentLoss {
        let c = &self.cfg;
        let on = |flag: bool, slot: usize| if flag { Term::On(v[slot]) } else { Term::Off };
        let self_distill = if !c.self_distill {
            Term::Off
        } else if self.heads == 0 {
            Term::Absent
        } else {
            let kl = &v[SLOT_SELF..SLOT_SELF + self.heads];
            Term::On(kl.iter().sum::<f64>() / self.heads as f64)
        };
        let (hard, soft) = (on(c.hard, SLOT_HARD), on(c.soft, SLOT_SOFT));
        let (coarse, fine) = (on(c.coarse, SLOT_COARSE), on(c.fine, SLOT_FINE));
        let total = hard.value()
            + c.alpha * soft.value()
            + c.beta * coarse.value()
            + c.gamma * fine.value()
            + c.delta * self_distill.value();
        StudentLoss {
            hard,
            soft,
            coarse,
            fine,
            self_distill,
            total,
        }
    }
}

/// Student stage (docs/model.md §5): reads the frozen teacher's outputs (only when L_soft,
/// L_coarse or L_fine is on: from its cache, or by running its forward) and runs the student
/// forward, every switched-on term, and with `backward`
/// accumulates ∂L/∂θ_student into the student's gradient buffer. Returns the per-term values
/// and the total (waits for the device; see [`student_objective_queued`]).
pub fn student_objective<B: Backend>(
    be: &B,
    cfg: &LossConfig,
    class_w: [f64; 2],
    teacher: Teacher<'_, B>,
    student: &mut Model<B>,
    batch: &DeviceBatch<B>,
    backward: bool,
) -> Result<StudentLoss> {
    let slots = StudentSlots::new(cfg, student);
    let mut out = zeros_full(be, slots.len())?;
    let m = Mut::whole(&mut out);
    student_objective_queued(be, cfg, class_w, None, teacher, student, batch, backward, m)?;
    let v: Vec<f64> = be.download(&out)?.iter().map(|x| x.to_f64()).collect();
    Ok(slots.read(&v))
}

/// [`student_objective`] without waiting: the terms are stored on the device in the
/// [`StudentSlots`] layout from `out`'s offset on (`StudentSlots::len()` elements; slots of
/// terms that are off are left as they are). With a data-parallel `share` (device
/// `[rows, fine]`), this rank's part of the batch counts for its share of the global
/// batch's means: the row weights of every term are scaled by `share[0]`, L_fine's by
/// `share[1]` ([`crate::dist::BatchShare`]).
#[allow(clippy::too_many_arguments)]
pub fn student_objective_queued<B: Backend>(
    be: &B,
    cfg: &LossConfig,
    class_w: [f64; 2],
    share: Option<Ref<B::Buf>>,
    teacher: Teacher<'_, B>,
    student: &mut Model<B>,
    batch: &DeviceBatch<B>,
    backward: bool,
    out: Mut<B::Buf>,
) -> Result<()> {
    if teacher.model.config.role != Role::Teacher || student.config.role != Role::Student {
        return Err(Error::invalid(
            "student objective needs a teacher and a student",
        ));
    }
    // A student that reads no teacher output (the plain student) may have its own width.
    let reads_teacher = cfg.soft || cfg.coarse || cfg.fine;
    if reads_teacher && teacher.model.config.d != student.config.d {
        return Err(Error::invalid(format!(
            "teacher width d = {} differs from the student's {}: a student that reads the \
             teacher (L_soft, L_coarse or L_fine) has its width",
            teacher.model.config.d, student.config.d
        )));
    }
    cfg.validate()?;
    // Every term's row weights carry the rows share, L_fine's the fine share.
    let (raw, labels) = row_weights(be, batch, class_w)?;
    let scaled_w = share_scaled(be, batch.rows, &raw, share, 0)?;
    let w = scaled_w.as_ref().unwrap_or(&raw);
    // The teacher is read only when a term reads it (L_self and L_hard do not), its tokens
    // only for L_fine.
    let mut t = if reads_teacher {
        Some(teacher.outputs(be, batch, cfg.fine)?)
    } else {
        None
    };
    let teacher_out = || {
        t.as_ref()
            .ok_or_else(|| Error::invalid("teacher forward missing"))
    };
    let s = student.forward(be, batch)?;
    let (n, d) = (batch.rows, student.config.d);
    let f = <B::F as Float>::from_f64;
    let tau = f(cfg.tau);
    let wr = Ref::whole(w);
    let mut dz = zeros_full(be, n)?;
    let zs = Ref::whole(&s.logits);
    let (slots, base) = (out.buf, out.off);
    if cfg.hard {
        let g = backward.then(|| Mut::whole(&mut dz));
        let o = Mut::at(&mut *slots, base + SLOT_HARD);
        be.bce_loss_into(n, zs, Ref::whole(labels), wr, one::<B::F>(), g, o)?;
    }
    if cfg.soft {
        let g = backward.then(|| Mut::whole(&mut dz));
        let zt = Ref::whole(&teacher_out()?.logits);
        let o = Mut::at(&mut *slots, base + SLOT_SOFT);
        be.bernoulli_kl_loss_into(n, zs, zt, Some(wr), tau, f(cfg.alpha), g, o)?;
    }
    let mut dhidden = None;
    if cfg.coarse {
        let lin = student
            .layout
            .coarse
            .ok_or_else(|| Error::invalid("no coarse head"))?;
        let (params, grads) = student.params.weights_and_grads();
        let mut pred = uninit(be, n * d)?;
        lin.forward(
            be,
            params,
            n,
            Ref::whole(&s.hidden),
            Mut::whole(&mut pred),
            false,
        );
        let mut dpred = zeros(be, n * d)?;
        let g = backward.then(|| Mut::whole(&mut dpred));
        let (pr, tr) = (Ref::whole(&pred), Ref::whole(&teacher_out()?.hidden));
        let o = Mut::at(&mut *slots, base + SLOT_COARSE);
        be.coarse_loss_into(n, d, pr, tr, wr, cfg.coarse_cosine, f(cfg.beta), g, o)?;
        if backward {
            let mut dh = zeros(be, n * d)?;
            let (x, dy) = (Ref::whole(&s.hidden), Ref::whole(&dpred));
            lin.backward(
                be,
                params,
                grads,
                n,
                x,
                dy,
                Some(Mut::whole(&mut dh)),
                false,
            );
            dhidden = Some(dh);
        }
    }
    let (mut dtokens, mut dp) = (None, None);
    if cfg.fine {
        // L_fine is the last reader of the teacher's tokens: it gives them back once its
        // kernel has run.
        let t_in = t
            .as_mut()
            .and_then(|t| t.tokens.take())
            .ok_or_else(|| Error::invalid("teacher token outputs missing"))?;
        let o = Mut::at(&mut *slots, base + SLOT_FINE);
        // L_fine is a mean over the rows with in-service events: its own share.
        let w_fine = share_scaled(be, n, &raw, share, 1)?;
        let wf = w_fine.as_ref().unwrap_or(&raw);
        if let Some((dt, dpp)) =
            fine_term(be, cfg.gamma, student, batch, &s, t_in, wf, backward, o)?
        {
            dtokens = Some(dt);
            dp = Some(dpp);
        }
    }
    // No term reads the teacher after L_fine: give its outputs (T_in the largest) back
    // before the student's backward.
    drop(t);
    let mut daux = Vec::new();
    if cfg.self_distill && !s.aux_logits.is_empty() {
        let coef = f(cfg.delta / s.aux_logits.len() as f64);
        // L_self weighs rows equally: under a share, every row weighs share[0].
        let w_self = match share {
            None => None,
            Some(_) => {
                let mut ones = uninit_full(be, n)?;
                be.fill(n, one::<B::F>(), Mut::whole(&mut ones));
                share_scaled(be, n, &ones, share, 0)?
            }
        };
        for (l, zl) in s.aux_logits.iter().enumerate() {
            let mut dzl = zeros_full(be, n)?;
            let g = backward.then(|| Mut::whole(&mut dzl));
            let o = Mut::at(&mut *slots, base + SLOT_SELF + l);
            let ws = w_self.as_ref().map(Ref::whole);
            be.bernoulli_kl_loss_into(n, Ref::whole(zl), zs, ws, tau, coef, g, o)?;
            daux.push(dzl);
        }
    }
    if backward {
        let g = OutputGrads {
            logits: dz,
            aux_logits: daux,
            hidden: dhidden,
            tokens: dtokens,
            p: dp,
        };
        student.backward(be, batch, s, g)?;
    }
    Ok(())
}

/// `L_fine` (docs/model.md §5.6) with coefficient `gamma`: student tokens are `T_pre` (or `p` in
/// slot 0 for rows with an empty pre-service sequence), teacher tokens `t_in` (detached; given
/// back once the kernel has read them, and the student tokens and queries made again for the
/// backward, so the kernel's moment holds four student-token buffers besides `t_in`). Stores
/// the value at `out[0]` and returns, with `backward`, `(∂L/∂T_pre, ∂L/∂p)` (the W_q/W_k/W_v
/// gradients are accumulated here).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn fine_term<B: Backend>(
    be: &B,
    gamma: f64,
    student: &mut Model<B>,
    batch: &DeviceBatch<B>,
    s: &crate::model::Forward<B>,
    t_in: B::Buf,
    w: &B::Buf,
    backward: bool,
    out: Mut<B::Buf>,
) -> Result<Option<(B::Buf, B::Buf)>> {
    let proj = student
        .layout
        .fine
        .ok_or_else(|| Error::invalid("no fine projections"))?;
    let (n, d) = (batch.rows, student.config.d);
    let (lq, lk) = (batch.pre.len, batch.in_service.len);
    let nq = n * lq;
    let pre_lens = &batch.pre.lens;
    // The student's tokens: T_pre, with p in slot 0 of the rows without pre-service events.
    let tokens = || -> Result<B::Buf> {
        let mut tok = uninit(be, nq * d)?;
        let t_pre = Ref::whole(&s.encoder.out.tokens);
        be.copy(nq * d, t_pre, Mut::whole(&mut tok));
        let (p, t) = (Ref::whole(&s.profile.p), Mut::whole(&mut tok));
        be.put_empty_rows(n, lq, d, pre_lens, p, t);
        Ok(tok)
    };
    let (params, g) = student.params.weights_and_grads();
    let queries = |tok: &B::Buf| -> Result<B::Buf> {
        let mut q = uninit(be, nq * d)?;
        proj.q
            .forward(be, params, nq, Ref::whole(tok), Mut::whole(&mut q), false);
        Ok(q)
    };
    // The scores (W_q·x_j + b_q)·(W_k·t_k + b_k) are q_j·(W_k·t_k) plus q_j·b_k, which is
    // the same for every key k of token j, so the softmax does not see it: the queries go
    // into the teacher tokens' space (qk_j = W_kᵀ·q_j) and the teacher tokens are the keys.
    // No ℓk×d key buffer or its gradient exists, and b_k's gradient, exactly zero, is left
    // untouched.
    let tok = tokens()?;
    let q = queries(&tok)?;
    let (mut qk, mut v) = (uninit(be, nq * d)?, uninit(be, nq * d)?);
    proj.k
        .backward_input(be, params, nq, Ref::whole(&q), Mut::whole(&mut qk), false);
    proj.v
        .forward(be, params, nq, Ref::whole(&tok), Mut::whole(&mut v), false);
    // The kernel reads neither: the backward makes them again (the same operations, so
    // the same bits), and the kernel's moment holds four student-token buffers, not six.
    drop((tok, q));
    let shape = FineShape {
        batch: n,
        lq,
        lk,
        d,
    };
    // The gradients' buffers exist only for a backward (a validation pass needs none).
    let mut grad_bufs = if backward {
        Some((zeros(be, nq * d)?, zeros(be, nq * d)?))
    } else {
        None
    };
    let grads = grad_bufs.as_mut().map(|(dqk, dv)| FineGrads {
        dq: Mut::whole(dqk),
        dv: Mut::whole(dv),
    });
    be.fine_loss_into(
        shape,
        Ref::whole(&qk),
        Ref::whole(&v),
        Ref::whole(&t_in),
        &batch.pre.lens_or_one,
        &batch.in_service.lens,
        Ref::whole(w),
        <B::F as Float>::from_f64(gamma),
        grads,
        out,
    )?;
    drop((qk, v, t_in));
    let Some((dqk, dv)) = grad_bufs else {
        return Ok(None);
    };
    let tok = tokens()?;
    let q = queries(&tok)?;
    let mut dq = uninit(be, nq * d)?;
    proj.k.transpose_backward(
        be,
        params,
        g,
        nq,
        Ref::whole(&q),
        Ref::whole(&dqk),
        Mut::whole(&mut dq),
    );
    drop((q, dqk));
    let mut dtok = uninit(be, nq * d)?;
    let tr = Ref::whole(&tok);
    proj.q.backward(
        be,
        params,
        g,
        nq,
        tr,
        Ref::whole(&dq),
        Some(Mut::whole(&mut dtok)),
        false,
    );
    proj.v.backward(
        be,
        params,
        g,
        nq,
        tr,
        Ref::whole(&dv),
        Some(Mut::whole(&mut dtok)),
        true,
    );
    let mut dp = zeros(be, n * d)?;
    be.put_empty_rows_backward(
        n,
        lq,
        d,
        pre_lens,
        Mut::whole(&mut dtok),
        Mut::whole(&mut dp),
    );
    Ok(Some((dtok, dp)))
}
