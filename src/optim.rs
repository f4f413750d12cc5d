//! The optimizer of SPEC §6 over a model's flat buffers: global gradient norm, clipping
//! factor, and one AdamW pass (the learning-rate schedule belongs to the trainer).

use crate::backend::{AdamW, Backend, Float, Ref};
use crate::model::ParamStore;
use crate::{Error, Result};

/// AdamW hyper-parameters without the learning rate (SPEC §6 defaults).
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

/// Clipping factor `min(1, c/‖g‖)` (1 for a zero gradient); an error for a non-finite norm
/// (the step would destroy the parameters).
pub fn clip_factor(norm: f64, clip: f64) -> Result<f64> {
    if !norm.is_finite() {
        return Err(Error::invalid(format!(
            "gradient norm is {norm}: training diverged"
        )));
    }
    Ok(if norm > clip { clip / norm } else { 1.0 })
}

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
    /// `θ ← θ − lr·(m̂/(√v̂ + ε) + λ·mask·θ)` with bias-corrected `m̂, v̂`.
    pub fn step<B: Backend>(
        &mut self,
        be: &B,
        store: &mut ParamStore<B>,
        lr: f64,
    ) -> Result<StepInfo> {
        let norm = grad_norm(be, store)?;
        let scale = clip_factor(norm, self.config.clip)?;
        self.step += 1;
        let c = self.config;
        let hp = AdamW {
            lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            step: self.step,
            grad_scale: scale,
        };
        let s = store;
        be.adamw(
            &hp,
            &mut s.values,
            &s.grads,
            &mut s.m,
            &mut s.v,
            &s.decay_mask,
        );
        Ok(StepInfo {
            step: self.step,
            grad_norm: norm,
            scale,
        })
    }
}
