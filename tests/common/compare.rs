//! Comparisons: closeness with tolerances, bit-for-bit equality.

use cppo::ndarray::{Array1, Array2};
use cppo::{Evaluation, Float};

/// |a − b| ≤ rel · max(|a|, |b|) + abs, with NaN equal to NaN only.
pub fn close(a: f64, b: f64, rel: f64, abs: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    a == b || (a - b).abs() <= rel * a.abs().max(b.abs()) + abs
}

/// Every element close, or a message naming the first that is not.
pub fn check_close<F: Float>(
    what: &str,
    got: &Array2<F>,
    want: &Array2<f64>,
    rel: f64,
    abs: f64,
) -> Result<(), String> {
    if got.dim() != want.dim() {
        return Err(format!("{what}: shape {:?} vs {:?}", got.dim(), want.dim()));
    }
    for ((ij, g), &w) in got.indexed_iter().zip(want.iter()) {
        if !close(g.to_f64(), w, rel, abs) {
            return Err(format!("{what}{ij:?}: got {:e}, want {w:e}", g.to_f64()));
        }
    }
    Ok(())
}

/// Bit-for-bit equality of two float arrays (NaN payloads included).
pub fn same_bits<F: Float>(what: &str, a: &Array2<F>, b: &Array2<F>) -> Result<(), String> {
    if a.dim() != b.dim() {
        return Err(format!("{what}: shape {:?} vs {:?}", a.dim(), b.dim()));
    }
    for ((ij, x), y) in a.indexed_iter().zip(b.iter()) {
        if x.to_f64().to_bits() != y.to_f64().to_bits() {
            return Err(format!("{what}{ij:?}: {x:?} vs {y:?}"));
        }
    }
    Ok(())
}

/// Every output of two evaluations bit for bit, the loss included.
pub fn same_eval<F: Float>(a: &Evaluation<F>, b: &Evaluation<F>) -> Result<(), String> {
    if a.loss.to_bits() != b.loss.to_bits() {
        return Err(format!("loss: {:e} vs {:e}", a.loss, b.loss));
    }
    let (x, y) = (&a.outputs, &b.outputs);
    same_bits("divergence", &x.divergence, &y.divergence)?;
    same_bits("weight", &x.weight, &y.weight)?;
    same_bits("threshold", &x.threshold, &y.threshold)?;
    same_bits("token_loss", &x.token_loss, &y.token_loss)?;
    same_bits("grad", &x.grad, &y.grad)?;
    if x.keep != y.keep {
        return Err("keep differs".into());
    }
    if x.reason != y.reason {
        return Err("reason differs".into());
    }
    same_bits_1d("delta_b_row", &x.delta_b_row, &y.delta_b_row)
}

/// Bit-for-bit equality of two (B,) float arrays.
pub fn same_bits_1d<F: Float>(what: &str, a: &Array1<F>, b: &Array1<F>) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{what}: length {} vs {}", a.len(), b.len()));
    }
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        if x.to_f64().to_bits() != y.to_f64().to_bits() {
            return Err(format!("{what}[{i}]: {x:?} vs {y:?}"));
        }
    }
    Ok(())
}
