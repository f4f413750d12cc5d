//! The objectives of SPEC §5: class weights, the teacher stage (weighted BCE) and the
//! student stage `L = L_hard + α·L_soft + β·L_coarse + γ·L_fine + δ·L_self` with every term
//! switchable. Each objective runs the forward passes, the backend's fused loss ops and the
//! student's (or teacher's) backward; the frozen teacher of the student stage only runs
//! forward and is borrowed immutably, so nothing of it can be written.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, FineGrads, FineShape, Float, Mut, Ref};
use crate::model::layers::{one, zero, zeros};
use crate::model::{DeviceBatch, Model, OutputGrads, Role};
use crate::{Error, Result};

fn yes() -> bool {
    true
}

/// Coefficients and switches of the student-stage objective (SPEC §5).
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
    /// δ = 0.1, τ = 1, ρ = 0.5 (the SPEC's starting point was α = β = γ = 1, δ = 0.5,
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
    /// The SPEC §5 starting coefficients, α = β = γ = 1, δ = 0.5, τ = 2, with every term and
    /// re-weighting on: every term at a sizeable weight, as the gradient and parity checks
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

/// Class weights `[w_0, w_1]` from the train split's counts (SPEC §5):
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
    match (&batch.labels, &batch.labels_host) {
        (Some(l), Some(h)) => {
            let w: Vec<B::F> = h
                .iter()
                .map(|&y| <B::F as Float>::from_f64(cw[(y & 1) as usize]))
                .collect();
            Ok((be.upload(&w)?, l))
        }
        _ => Err(Error::invalid("training needs labels; the batch has none")),
    }
}

/// Teacher stage `L_T = mean_i w_i·BCE(y_i, σ(z_t,i))`. With `backward`, accumulates
/// ∂L_T/∂θ into the teacher's gradient buffer. Returns `L_T`.
pub fn teacher_objective<B: Backend>(
    be: &B,
    class_w: [f64; 2],
    teacher: &mut Model<B>,
    batch: &DeviceBatch<B>,
    backward: bool,
) -> Result<f64> {
    let (w, labels) = row_weights(be, batch, class_w)?;
    let fwd = teacher.forward(be, batch)?;
    let n = batch.rows;
    let mut dz = zeros(be, n)?;
    let dzm = backward.then(|| Mut::whole(&mut dz));
    let (z, y, wr) = (Ref::whole(&fwd.logits), Ref::whole(labels), Ref::whole(&w));
    let loss = be.bce_loss(n, z, y, wr, one::<B::F>(), dzm)?;
    if backward {
        let g = OutputGrads {
            logits: dz,
            aux_logits: Vec::new(),
            hidden: None,
            tokens: None,
            p: None,
        };
        teacher.backward(be, batch, &fwd, &g)?;
    }
    Ok(loss.to_f64())
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

fn on(flag: bool, f: impl FnOnce() -> Result<f64>) -> Result<Term> {
    if flag {
        Ok(Term::On(f()?))
    } else {
        Ok(Term::Off)
    }
}

/// Student stage (SPEC §5): runs the frozen teacher forward (only when L_soft, L_coarse or
/// L_fine is on) and the student forward, every switched-on term, and with `backward` accumulates ∂L/∂θ_student into the student's
/// gradient buffer. Returns the per-term values and the total.
pub fn student_objective<B: Backend>(
    be: &B,
    cfg: &LossConfig,
    class_w: [f64; 2],
    teacher: &Model<B>,
    student: &mut Model<B>,
    batch: &DeviceBatch<B>,
    backward: bool,
) -> Result<StudentLoss> {
    if teacher.config.role != Role::Teacher || student.config.role != Role::Student {
        return Err(Error::invalid(
            "student objective needs a teacher and a student",
        ));
    }
    if teacher.config.d != student.config.d {
        return Err(Error::invalid(format!(
            "teacher width d = {} differs from the student's {}",
            teacher.config.d, student.config.d
        )));
    }
    cfg.validate()?;
    let (w, labels) = row_weights(be, batch, class_w)?;
    // The teacher runs only when a term reads it (L_self and L_hard do not).
    let t = if cfg.soft || cfg.coarse || cfg.fine {
        Some(teacher.forward(be, batch)?)
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
    let wr = Ref::whole(&w);
    let mut dz = zeros(be, n)?;
    let zs = Ref::whole(&s.logits);
    let hard = on(cfg.hard, || {
        let g = backward.then(|| Mut::whole(&mut dz));
        Ok(be
            .bce_loss(n, zs, Ref::whole(labels), wr, one::<B::F>(), g)?
            .to_f64())
    })?;
    let soft = on(cfg.soft, || {
        let g = backward.then(|| Mut::whole(&mut dz));
        let zt = Ref::whole(&teacher_out()?.logits);
        Ok(be
            .bernoulli_kl_loss(n, zs, zt, Some(wr), tau, f(cfg.alpha), g)?
            .to_f64())
    })?;
    let mut dhidden = None;
    let coarse = on(cfg.coarse, || {
        let lin = student
            .layout
            .coarse
            .ok_or_else(|| Error::invalid("no coarse head"))?;
        let params = &student.params.values;
        let mut pred = zeros(be, n * d)?;
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
        let v = be.coarse_loss(n, d, pr, tr, wr, cfg.coarse_cosine, f(cfg.beta), g)?;
        if backward {
            let mut dh = zeros(be, n * d)?;
            let grads = &mut student.params.grads;
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
        Ok(v.to_f64())
    })?;
    let (mut dtokens, mut dp) = (None, None);
    let fine = on(cfg.fine, || {
        let t = teacher_out()?;
        let (v, grads) = fine_term(be, cfg.gamma, student, batch, &s, t, &w, backward)?;
        if let Some((dt, dpp)) = grads {
            dtokens = Some(dt);
            dp = Some(dpp);
        }
        Ok(v)
    })?;
    let mut daux = Vec::new();
    let self_distill = if !cfg.self_distill {
        Term::Off
    } else if s.aux_logits.is_empty() {
        Term::Absent
    } else {
        let heads = s.aux_logits.len() as f64;
        let coef = f(cfg.delta / heads);
        let mut sum = 0.0;
        for zl in &s.aux_logits {
            let mut dzl = zeros(be, n)?;
            let g = backward.then(|| Mut::whole(&mut dzl));
            sum += be
                .bernoulli_kl_loss(n, Ref::whole(zl), zs, None, tau, coef, g)?
                .to_f64();
            daux.push(dzl);
        }
        Term::On(sum / heads)
    };
    let total = hard.value()
        + cfg.alpha * soft.value()
        + cfg.beta * coarse.value()
        + cfg.gamma * fine.value()
        + cfg.delta * self_distill.value();
    if backward {
        let g = OutputGrads {
            logits: dz,
            aux_logits: daux,
            hidden: dhidden,
            tokens: dtokens,
            p: dp,
        };
        student.backward(be, batch, &s, &g)?;
    }
    Ok(StudentLoss {
        hard,
        soft,
        coarse,
        fine,
        self_distill,
        total,
    })
}

/// `L_fine` (SPEC §5) with coefficient `gamma`: student tokens are `T_pre` (or `p` in slot 0
/// for rows with an empty pre-service sequence), teacher tokens `T_in` (detached). Returns
/// the value and, with `backward`, `(∂L/∂T_pre, ∂L/∂p)` (the W_q/W_k/W_v gradients are
/// accumulated here).
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn fine_term<B: Backend>(
    be: &B,
    gamma: f64,
    student: &mut Model<B>,
    batch: &DeviceBatch<B>,
    s: &crate::model::Forward<B>,
    t: &crate::model::Forward<B>,
    w: &B::Buf,
    backward: bool,
) -> Result<(f64, Option<(B::Buf, B::Buf)>)> {
    let proj = student
        .layout
        .fine
        .ok_or_else(|| Error::invalid("no fine projections"))?;
    let (n, d) = (batch.rows, student.config.d);
    let (lq, lk) = (batch.pre.len, batch.in_service.len);
    let (nq, nk) = (n * lq, n * lk);
    let empty: Vec<usize> = (0..n).filter(|&b| batch.pre.lens_host[b] == 0).collect();
    let mut tok = zeros(be, nq * d)?;
    be.copy(
        nq * d,
        Ref::whole(&s.encoder.out.tokens),
        Mut::whole(&mut tok),
    );
    for &b in &empty {
        let (src, dst) = (Ref::at(&s.profile.p, b * d), Mut::at(&mut tok, b * lq * d));
        be.copy_2d(1, d, src, d, dst, d, false);
    }
    let params = &student.params.values;
    let t_in = Ref::whole(&t.encoder.out.tokens);
    let (mut q, mut k, mut v) = (zeros(be, nq * d)?, zeros(be, nk * d)?, zeros(be, nq * d)?);
    proj.q
        .forward(be, params, nq, Ref::whole(&tok), Mut::whole(&mut q), false);
    proj.k
        .forward(be, params, nk, t_in, Mut::whole(&mut k), false);
    proj.v
        .forward(be, params, nq, Ref::whole(&tok), Mut::whole(&mut v), false);
    let shape = FineShape {
        batch: n,
        lq,
        lk,
        d,
    };
    let (mut dq, mut dk, mut dv) = (zeros(be, nq * d)?, zeros(be, nk * d)?, zeros(be, nq * d)?);
    let grads = backward.then(|| FineGrads {
        dq: Mut::whole(&mut dq),
        dk: Mut::whole(&mut dk),
        dv: Mut::whole(&mut dv),
    });
    let value = be.fine_loss(
        shape,
        Ref::whole(&q),
        Ref::whole(&k),
        Ref::whole(&v),
        t_in,
        &batch.pre.lens_or_one,
        &batch.in_service.lens,
        Ref::whole(w),
        <B::F as Float>::from_f64(gamma),
        grads,
    )?;
    if !backward {
        return Ok((value.to_f64(), None));
    }
    let g = &mut student.params.grads;
    let mut dtok = zeros(be, nq * d)?;
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
    proj.k
        .backward(be, params, g, nk, t_in, Ref::whole(&dk), None, false);
    let mut dp = zeros(be, n * d)?;
    for &b in &empty {
        let (src, dst) = (Ref::at(&dtok, b * lq * d), Mut::at(&mut dp, b * d));
        be.copy_2d(1, d, src, d, dst, d, false);
        be.fill(d, zero::<B::F>(), Mut::at(&mut dtok, b * lq * d));
    }
    Ok((value.to_f64(), Some((dtok, dp))))
}
