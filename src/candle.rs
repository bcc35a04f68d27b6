//! candle glue (feature `candle`): the loss as a candle tensor whose backward is the
//! crate's exact gradient.
//!
//! The crate has no autodiff of its own; it returns dL/dlogp. [`loss`] copies the inputs
//! to the host (from any device), runs [`evaluate`] there, and builds a
//! scalar tensor on `logp`'s device from two parts, with g the crate's gradient as a
//! constant and m the response mask:
//!
//! ```text
//! s    = Σ g ⊙ where(m, logp, 0)          (differentiable in logp; d s / d logp = g)
//! loss = (s − detach(s)) + L              (its value is L, its gradient is g)
//! ```
//!
//! `s − detach(s)` is exactly 0 (the same number minus itself), so the tensor's value is
//! the crate's loss L rounded to `logp`'s float type, and its backward gives `logp` the
//! gradient g bit for bit: each step of the backward (the sum's, the product's, the
//! `where`'s, the subtraction's) multiplies by exactly 1 or passes g through. The `where`
//! keeps whatever the padding holds (NaN, −∞) out of the value; the gradient there is 0.
//!
//! `logp` must have the float type the call names (`f32` or `f64`) and carry the graph;
//! the other tensors are constants of any float type (converted), and the mask may be
//! `u8`, `u32`, `i64` or a float. Errors of the crate become `candle_core::Error`s
//! (`From<cppo::Error>`), so `?` works inside a function returning `candle_core::Result`.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use cppo::{Config, Par};
//!
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! let logp = Var::from_slice(&[-0.2f32, -1.0, -0.1, -2.5], (1, 4), &dev)?; // the policy's
//! let logp_old = Tensor::new(&[[-0.3f32, -1.6, -0.1, -1.2]], &dev)?;
//! let advantages = Tensor::new(&[1.0f32], &dev)?;
//! let mask = Tensor::new(&[[1u8, 1, 1, 0]], &dev)?;
//!
//! let inputs = cppo::candle::Inputs::new(&logp, &logp_old, &advantages, &mask);
//! let (loss, eval) = cppo::candle::loss::<f32>(&Config::cppo(), &inputs, Par::Seq)?;
//! assert_eq!(loss.to_scalar::<f32>()?, eval.loss as f32);
//! let grads = loss.backward()?;
//! let g = grads.get(&logp).unwrap().to_vec2::<f32>()?;
//! assert_eq!(g[0], eval.outputs.grad.row(0).to_vec()); // the crate's gradient, exactly
//! # Ok(())
//! # }
//! ```

use candle_core::{DType, Tensor, WithDType};
use ndarray::{Array1, Array2, Array3};

use crate::engine::{Evaluation, evaluate};
use crate::error::Error;
use crate::float::Float;
use crate::{Batch, Config, Par};

impl From<Error> for candle_core::Error {
    /// The crate's error, its message kept (`candle_core::Error::Wrapped`).
    ///
    /// ```
    /// let e: candle_core::Error = cppo::Error::InvalidConfig { field: "rule.delta", reason: "bad".into() }.into();
    /// assert!(e.to_string().contains("rule.delta"));
    /// ```
    fn from(e: Error) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// The tensors of one batch, as [`Batch`] holds arrays: `logp`, `logp_old`, `mask`
/// (B, L), `advantages` (B,) or (B, L), and the optional ones.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let lp = Tensor::new(&[[-0.5f32, -0.7]], &dev)?;
/// let (adv, mask) = (Tensor::new(&[1.0f32], &dev)?, Tensor::new(&[[1u8, 1]], &dev)?);
/// let inputs = cppo::candle::Inputs::new(&lp, &lp, &adv, &mask).with_logp_ref(&lp);
/// assert!(inputs.logp_ref.is_some());
/// # Ok::<(), candle_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The current policy's log-probs of the sampled tokens, (B, L), with their graph.
    pub logp: &'a Tensor,
    /// The rollout policy's log-probs, (B, L).
    pub logp_old: &'a Tensor,
    /// Advantages, (B,) or (B, L).
    pub advantages: &'a Tensor,
    /// The response mask, (B, L): nonzero at response tokens.
    pub mask: &'a Tensor,
    /// `topk_logp_old` and `topk_logp`, (B, L, K), for the top-K divergences.
    pub topk: Option<(&'a Tensor, &'a Tensor)>,
    /// The reference policy's log-probs, (B, L), for a KL penalty.
    pub logp_ref: Option<&'a Tensor>,
    /// Rollout importance-sampling weights, (B, L).
    pub is_weights: Option<&'a Tensor>,
}

impl<'a> Inputs<'a> {
    /// The four tensors every config needs.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let t = Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?;
    /// let a = Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?;
    /// assert!(cppo::candle::Inputs::new(&t, &t, &a, &t).topk.is_none());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    pub fn new(
        logp: &'a Tensor,
        logp_old: &'a Tensor,
        advantages: &'a Tensor,
        mask: &'a Tensor,
    ) -> Self {
        Self {
            logp,
            logp_old,
            advantages,
            mask,
            topk: None,
            logp_ref: None,
            is_weights: None,
        }
    }

    /// With the rollout's top-K log-probs under μ and under π_θ, (B, L, K).
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let t = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu)?;
    /// let k = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &Device::Cpu)?;
    /// let a = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu)?;
    /// assert!(cppo::candle::Inputs::new(&t, &t, &a, &t).with_topk(&k, &k).topk.is_some());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    #[must_use]
    pub fn with_topk(mut self, topk_logp_old: &'a Tensor, topk_logp: &'a Tensor) -> Self {
        self.topk = Some((topk_logp_old, topk_logp));
        self
    }

    /// With the reference policy's log-probs (B, L), for a KL penalty.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let t = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu)?;
    /// let a = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu)?;
    /// assert!(cppo::candle::Inputs::new(&t, &t, &a, &t).with_logp_ref(&t).logp_ref.is_some());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    #[must_use]
    pub fn with_logp_ref(mut self, logp_ref: &'a Tensor) -> Self {
        self.logp_ref = Some(logp_ref);
        self
    }

    /// With rollout importance-sampling weights (B, L), verl's `rollout_is_weights`.
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// let t = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu)?;
    /// let a = Tensor::zeros(1, candle_core::DType::F32, &Device::Cpu)?;
    /// let w = t.ones_like()?;
    /// assert!(cppo::candle::Inputs::new(&t, &t, &a, &t).with_is_weights(&w).is_weights.is_some());
    /// # Ok::<(), candle_core::Error>(())
    /// ```
    #[must_use]
    pub fn with_is_weights(mut self, is_weights: &'a Tensor) -> Self {
        self.is_weights = Some(is_weights);
        self
    }
}

/// The loss of `config` on `inputs` as a scalar tensor on `logp`'s device, whose backward
/// gives `logp` exactly the crate's gradient, and the full [`Evaluation`] (outputs and
/// diagnostics) computed on the host. `F` is `logp`'s float type; see the
/// [module docs](self) for the construction and an example.
///
/// Errors: a tensor of the wrong rank or shape, `logp` of another float type, or any
/// error of [`evaluate`] (a NaN at a response position, a bad config, ...), each naming
/// the array, as `candle_core::Error`.
///
/// ```
/// use candle_core::{Device, Tensor};
/// let dev = Device::Cpu;
/// let lp = Tensor::new(&[[f32::NAN, -0.7]], &dev)?;
/// let (adv, mask) = (Tensor::new(&[1.0f32], &dev)?, Tensor::new(&[[1u8, 1]], &dev)?);
/// let inputs = cppo::candle::Inputs::new(&lp, &lp, &adv, &mask);
/// let err = cppo::candle::loss::<f32>(&cppo::Config::cppo(), &inputs, cppo::Par::Seq).unwrap_err();
/// assert!(err.to_string().contains("logp at row 0, column 0"), "{err}");
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn loss<F: Float + WithDType>(
    config: &Config,
    inputs: &Inputs<'_>,
    par: Par,
) -> candle_core::Result<(Tensor, Evaluation<F>)> {
    let logp_t = inputs.logp;
    if logp_t.dtype() != <F as WithDType>::DTYPE {
        return Err(candle_core::Error::msg(format!(
            "logp is {:?}, but the loss was asked for in {:?}: convert it with \
             logp.to_dtype(DType::{:?}) (the conversion keeps the graph)",
            logp_t.dtype(),
            <F as WithDType>::DTYPE,
            <F as WithDType>::DTYPE
        )));
    }
    let logp = host2::<F>("logp", logp_t)?;
    let logp_old = host2::<F>("logp_old", inputs.logp_old)?;
    let mask = host_mask("mask", inputs.mask)?;
    let advantages = match inputs.advantages.rank() {
        1 => Advantages::Row(host1::<F>("advantages", inputs.advantages)?),
        _ => Advantages::Token(host2::<F>("advantages", inputs.advantages)?),
    };
    let topk = match inputs.topk {
        Some((old, cur)) => Some((
            host3::<F>("topk_logp_old", old)?,
            host3::<F>("topk_logp", cur)?,
        )),
        None => None,
    };
    let logp_ref = inputs
        .logp_ref
        .map(|t| host2::<F>("logp_ref", t))
        .transpose()?;
    let is_weights = inputs
        .is_weights
        .map(|t| host2::<F>("is_weights", t))
        .transpose()?;

    let eval = {
        let mut batch = match &advantages {
            Advantages::Row(a) => mask.batch(&logp, &logp_old, a.view())?,
            Advantages::Token(a) => mask.batch(&logp, &logp_old, a.view())?,
        };
        if let Some((old, cur)) = &topk {
            batch = batch.with_topk(old, cur)?;
        }
        if let Some(r) = &logp_ref {
            batch = batch.with_logp_ref(r)?;
        }
        if let Some(w) = &is_weights {
            batch = batch.with_is_weights(w)?;
        }
        evaluate(config, &batch, par)?
    };

    let dev = logp_t.device();
    let shape = logp_t.dims2()?;
    let grad = Tensor::from_slice(
        eval.outputs
            .grad
            .as_slice()
            .expect("evaluate's outputs are standard layout"),
        shape,
        dev,
    )?;
    let on = inputs.mask.to_device(dev)?.ne(0u8)?;
    let clean = on.where_cond(logp_t, &logp_t.zeros_like()?)?;
    let s = (grad * clean)?.sum_all()?;
    let loss = (&s - s.detach())?.affine(1.0, eval.loss)?;
    Ok((loss, eval))
}

enum Advantages<F> {
    Row(Array1<F>),
    Token(Array2<F>),
}

/// A mask copied to the host in its own element type.
enum HostMask {
    U8(Array2<u8>),
    U32(Array2<u32>),
    I64(Array2<i64>),
    F32(Array2<f32>),
    F64(Array2<f64>),
}

impl HostMask {
    fn batch<'a, F: Float>(
        &'a self,
        logp: &'a Array2<F>,
        logp_old: &'a Array2<F>,
        advantages: impl Into<crate::batch::Advantages<'a, F>>,
    ) -> crate::Result<Batch<'a, F>> {
        match self {
            Self::U8(m) => Batch::new(logp, logp_old, advantages, m),
            Self::U32(m) => Batch::new(logp, logp_old, advantages, m),
            Self::I64(m) => Batch::new(logp, logp_old, advantages, m),
            Self::F32(m) => Batch::new(logp, logp_old, advantages, m),
            Self::F64(m) => Batch::new(logp, logp_old, advantages, m),
        }
    }
}

fn rank_err(name: &str, want: &str, t: &Tensor) -> candle_core::Error {
    candle_core::Error::msg(format!("{name} has shape {:?}, expected {want}", t.dims()))
}

fn host1<F: Float + WithDType>(name: &str, t: &Tensor) -> candle_core::Result<Array1<F>> {
    if t.rank() != 1 {
        return Err(rank_err(name, "(B,)", t));
    }
    Ok(Array1::from(
        t.to_dtype(<F as WithDType>::DTYPE)?.to_vec1::<F>()?,
    ))
}

fn host2<F: Float + WithDType>(name: &str, t: &Tensor) -> candle_core::Result<Array2<F>> {
    let Ok((b, l)) = t.dims2() else {
        return Err(rank_err(name, "(B, L)", t));
    };
    let v = t
        .to_dtype(<F as WithDType>::DTYPE)?
        .flatten_all()?
        .to_vec1::<F>()?;
    Ok(Array2::from_shape_vec((b, l), v).expect("the length is b·l"))
}

fn host3<F: Float + WithDType>(name: &str, t: &Tensor) -> candle_core::Result<Array3<F>> {
    let Ok((b, l, k)) = t.dims3() else {
        return Err(rank_err(name, "(B, L, K)", t));
    };
    let v = t
        .to_dtype(<F as WithDType>::DTYPE)?
        .flatten_all()?
        .to_vec1::<F>()?;
    Ok(Array3::from_shape_vec((b, l, k), v).expect("the length is b·l·k"))
}

fn host_mask(name: &str, t: &Tensor) -> candle_core::Result<HostMask> {
    let Ok((b, l)) = t.dims2() else {
        return Err(rank_err(name, "(B, L)", t));
    };
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => HostMask::U8(Array2::from_shape_vec((b, l), flat.to_vec1()?).expect("b·l")),
        DType::U32 => HostMask::U32(Array2::from_shape_vec((b, l), flat.to_vec1()?).expect("b·l")),
        DType::I64 => HostMask::I64(Array2::from_shape_vec((b, l), flat.to_vec1()?).expect("b·l")),
        DType::F64 => HostMask::F64(Array2::from_shape_vec((b, l), flat.to_vec1()?).expect("b·l")),
        _ => HostMask::F32(
            Array2::from_shape_vec((b, l), flat.to_dtype(DType::F32)?.to_vec1()?).expect("b·l"),
        ),
    })
}
