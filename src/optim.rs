//! The optimizer of docs/model.md §6.1 over a model's flat buffers: global gradient norm, clipping
//! factor, and one AdamW pass (the learning-rate schedule belongs to the trainer).

use crate::backend::{sched_values, AdamW, Backend, Float, Mut, Ref};
use crate::model::ParamStore;
use crate::Result;

/// AdamW hyper-parameters without the learning rate (defaults of docs/model.md §6.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β1 (0.9).
    pub beta1: f64,
    /// β2 (0.999).
    pub beta2: f64,
    /// ε (1e-8).
    pub eps: f64,
    /// Decoupled weight decay λ on linear weights (0.01).
    pub weight_decay: f64,
    /// Global-norm clipping threshold c (1.0): gradients are scaled by `min(1, c/‖g‖)`.
    pub clip: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            clip: 1.0,
        }
    }
}

/// The global gradient norm `‖g‖ = √(Σ g²)` over the whole gradient buffer.
pub fn grad_norm<B: Backend>(be: &B, store: &ParamStore<B>) -> Result<f64> {
    let ss = be.sum_squares(store.table.total(), Ref::whole(&store.grads))?;
    Ok(ss.to_f64().sqrt())
}

pub use crate::backend::clip_factor;

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// 1-based step number.
    pub step: u64,
    /// ‖g‖ before clipping.
    pub grad_norm: f64,
    /// The clipping factor applied.
    pub scale: f64,
}

/// AdamW with global-norm clipping over one model's flat buffers; counts its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Steps taken so far.
    pub step: u64,
}

impl Optimizer {
    /// An optimizer that has taken no step.
    pub fn new(config: AdamWConfig) -> Self {
        Optimizer { config, step: 0 }
    }

    /// One step at learning rate `lr`: `s = min(1, c/‖g‖)`, then for every element
    /// `g ← s·g`, `m ← β1·m + (1−β1)·g`, `v ← β2·v + (1−β2)·g²`,
    /// `θ ← θ − lr·(m̂/(√v̂ + ε) + λ·mask·θ)` with bias-corrected `m̂, v̂`. Waits for the
    /// device to report ‖g‖ (see [`Optimizer::step_queued`] for the form that does not).
    pub fn step<B: Backend>(
        &mut self,
        be: &B,
        store: &mut ParamStore<B>,
        lr: f64,
    ) -> Result<StepInfo> {
        let mut sum_sq = be.zeros(1)?;
        self.step_queued(be, store, lr, Mut::whole(&mut sum_sq))?;
        let norm = be.download(&sum_sq)?[0].to_f64().sqrt();
        Ok(StepInfo {
            step: self.step,
            grad_norm: norm,
            scale: clip_factor(norm, self.config.clip)?,
        })
    }

    /// [`Optimizer::step`] without waiting: `Σ g²` goes to `sum_sq[0]` and the clipping
    /// factor is computed from it on the device. A non-finite norm skips the update and is
    /// reported as an error by the backend's next synchronising call (at once on the CPU).
    pub fn step_queued<B: Backend>(
        &mut self,
        be: &B,
        store: &mut ParamStore<B>,
        lr: f64,
        sum_sq: Mut<B::Buf>,
    ) -> Result<()> {
        self.step += 1;
        self.apply(be, store, lr, sum_sq, None)
    }

    /// The host half of a step whose device half was recorded in a graph
    /// ([`Optimizer::apply_recorded`]): counts the step and writes its schedule constants
    /// `[lr, 1 − β1^t, 1 − β2^t]` to `sched`, where the recorded kernel reads them.
    pub fn advance_recorded<B: Backend>(
        &mut self,
        be: &B,
        lr: f64,
        sched: Mut<B::Buf>,
    ) -> Result<()> {
        self.step += 1;
        be.write(&sched_values::<B::F>(&self.hyper(lr)), sched)
    }

    /// The device half of a step, to record once and replay after each
    /// [`Optimizer::advance_recorded`]: `Σ g²`, clipping and AdamW with lr and the bias
    /// corrections read from `sched` (`lr` and the current step stand for them where the
    /// backend runs work at once).
    pub fn apply_recorded<B: Backend>(
        &self,
        be: &B,
        store: &mut ParamStore<B>,
        lr: f64,
        sum_sq: Mut<B::Buf>,
        sched: Ref<B::Buf>,
    ) -> Result<()> {
        self.apply(be, store, lr, sum_sq, Some(sched))
    }

    /// AdamW hyper-parameters of the current step at learning rate `lr`.
    fn hyper(&self, lr: f64) -> AdamW {
        let c = self.config;
        AdamW {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: self.step,
            grad_scale: 1.0,
        }
    }

    fn apply<B: Backend>(
        &self,
        be: &B,
        store: &mut ParamStore<B>,
        lr: f64,
        mut sum_sq: Mut<B::Buf>,
        sched: Option<Ref<B::Buf>>,
    ) -> Result<()> {
        be.sum_squares_into(
            store.table.total(),
            Ref::whole(&store.grads),
            sum_sq.reborrow(),
        )?;
        let s = store;
        be.adamw_clipped(
            &self.hyper(lr),
            self.config.clip,
            Ref::at(sum_sq.buf, sum_sq.off),
            sched,
            &mut s.values,
            &s.grads,
            &mut s.m,
            &mut s.v,
            &s.decay_mask,
        )?;
        s.refresh_compute(be);
        Ok(())
    }
}
