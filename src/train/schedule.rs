//! The learning-rate schedule of docs/model.md §6.2: linear warm-up over the first 5 % of the
//! steps, then cosine decay to 0.

/// Learning rate at 1-based optimizer step `step` of `total` planned steps, for peak rate
/// `lr` and warm-up share `warmup_frac` (docs/model.md §6.2: 0.05).
///
/// With `W = max(1, round(warmup_frac·total))` warm-up steps:
/// - `step ≤ W`: `lr·step/W` (linear warm-up; the first step already moves the weights),
/// - `step > W`: `lr·½·(1 + cos(π·(step − W)/(total − W)))`, reaching 0 at `step = total`.
///
/// Steps past `total` (and `step = 0`) get 0.
pub fn lr_at(step: u64, total: u64, lr: f64, warmup_frac: f64) -> f64 {
    if step == 0 || step > total {
        return 0.0;
    }
    let w = warmup_steps(total, warmup_frac);
    if step <= w {
        return lr * step as f64 / w as f64;
    }
    let progress = (step - w) as f64 / (total - w) as f64;
    lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Number of warm-up steps `max(1, round(warmup_frac·total))`, at most `total`.
pub fn warmup_steps(total: u64, warmup_frac: f64) -> u64 {
    let w = (warmup_frac.max(0.0) * total as f64).round() as u64;
    w.max(1).min(total.max(1))
}
