//! The policy: a small decoder-only transformer (GPT-2 style, pre-LayerNorm), written
//! with candle's tensor ops so that autodiff reaches every weight.
//!
//! The model is a function of its parameters: [`Params`] holds plain tensors. The
//! trained policy's tensors are candle `Var`s; a rollout policy is a detached copy of
//! them ([`Params::snapshot`]), which is how a policy kept a few updates behind is
//! stored.

use candle_core::{D, DType, Device, Result, Tensor, Var};
use candle_nn::ops::softmax;

use crate::rng::Rng;

/// Architecture sizes.
#[derive(Clone, Copy, Debug)]
pub struct Arch {
    pub vocab: usize,
    pub ctx: usize,
    pub d_model: usize,
    pub heads: usize,
    pub layers: usize,
}

#[derive(Clone, Debug)]
struct Layer {
    ln1_g: Tensor,
    ln1_b: Tensor,
    w_qkv: Tensor,
    w_o: Tensor,
    ln2_g: Tensor,
    ln2_b: Tensor,
    w_fc: Tensor,
    b_fc: Tensor,
    w_proj: Tensor,
    b_proj: Tensor,
}

/// The weights, as tensors (candle `Var`s for the trained policy).
#[derive(Clone, Debug)]
pub struct Params {
    arch: Arch,
    tok_emb: Tensor,
    pos_emb: Tensor,
    layers: Vec<Layer>,
    lnf_g: Tensor,
    lnf_b: Tensor,
    head: Tensor,
}

/// The trained policy: its parameters as `Var`s for the optimizer, and the same
/// tensors arranged as [`Params`] for the forward pass.
pub struct Policy {
    pub vars: Vec<Var>,
    pub params: Params,
}

impl Params {
    fn tensors(&self) -> Vec<&Tensor> {
        let mut v = vec![&self.tok_emb, &self.pos_emb];
        for l in &self.layers {
            v.extend([
                &l.ln1_g, &l.ln1_b, &l.w_qkv, &l.w_o, &l.ln2_g, &l.ln2_b, &l.w_fc, &l.b_fc,
                &l.w_proj, &l.b_proj,
            ]);
        }
        v.extend([&self.lnf_g, &self.lnf_b, &self.head]);
        v
    }

    fn from_tensors(arch: Arch, mut it: impl Iterator<Item = Tensor>) -> Self {
        let mut next = || it.next().expect("one tensor per parameter");
        let tok_emb = next();
        let pos_emb = next();
        let layers = (0..arch.layers)
            .map(|_| Layer {
                ln1_g: next(),
                ln1_b: next(),
                w_qkv: next(),
                w_o: next(),
                ln2_g: next(),
                ln2_b: next(),
                w_fc: next(),
                b_fc: next(),
                w_proj: next(),
                b_proj: next(),
            })
            .collect();
        Self {
            arch,
            tok_emb,
            pos_emb,
            layers,
            lnf_g: next(),
            lnf_b: next(),
            head: next(),
        }
    }

    /// Fresh weights: N(0, 0.02), residual projections scaled by 1/√(2·layers) (GPT-2),
    /// zero biases, unit LayerNorm gains. Drawn from `rng`, so a seed fixes them.
    pub fn init(arch: Arch, rng: &mut Rng, dev: &Device) -> Result<Self> {
        let d = arch.d_model;
        let mut normal = |shape: (usize, usize), std: f64| -> Result<Tensor> {
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| (rng.normal() * std) as f32)
                .collect();
            Tensor::from_vec(v, shape, dev)
        };
        let resid = 0.02 / (2.0 * arch.layers as f64).sqrt();
        let mut ts = vec![normal((arch.vocab, d), 0.02)?, normal((arch.ctx, d), 0.02)?];
        for _ in 0..arch.layers {
            ts.push(Tensor::ones(d, DType::F32, dev)?);
            ts.push(Tensor::zeros(d, DType::F32, dev)?);
            ts.push(normal((d, 3 * d), 0.02)?);
            ts.push(normal((d, d), resid)?);
            ts.push(Tensor::ones(d, DType::F32, dev)?);
            ts.push(Tensor::zeros(d, DType::F32, dev)?);
            ts.push(normal((d, 4 * d), 0.02)?);
            ts.push(Tensor::zeros(4 * d, DType::F32, dev)?);
            ts.push(normal((4 * d, d), resid)?);
            ts.push(Tensor::zeros(d, DType::F32, dev)?);
        }
        ts.push(Tensor::ones(d, DType::F32, dev)?);
        ts.push(Tensor::zeros(d, DType::F32, dev)?);
        ts.push(normal((d, arch.vocab), 0.02)?);
        Ok(Self::from_tensors(arch, ts.into_iter()))
    }

    /// A detached copy of the weights' current values: later optimizer steps on the
    /// original do not change it.
    pub fn snapshot(&self) -> Result<Self> {
        let ts = self
            .tensors()
            .into_iter()
            .map(|t| Ok(t.copy()?.detach()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_tensors(self.arch, ts.into_iter()))
    }

    /// Saves the weights to a safetensors file (tensors named `p000`, `p001`, … in
    /// the model's order), for a warm start reused across runs.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let named: std::collections::HashMap<String, Tensor> = self
            .tensors()
            .into_iter()
            .enumerate()
            .map(|(i, t)| (format!("p{i:03}"), t.clone()))
            .collect();
        candle_core::safetensors::save(&named, path)
    }

    /// Loads weights that [`Params::save`] wrote for the same architecture; an error if
    /// a tensor is missing or has another shape.
    pub fn load(arch: Arch, path: &std::path::Path, dev: &Device) -> Result<Self> {
        let mut named = candle_core::safetensors::load(path, dev)?;
        let shapes: Vec<_> = Self::init(arch, &mut Rng::new(0, 0), dev)?
            .tensors()
            .iter()
            .map(|t| t.dims().to_vec())
            .collect();
        let mut ts = Vec::with_capacity(shapes.len());
        for (i, shape) in shapes.iter().enumerate() {
            let t = named.remove(&format!("p{i:03}")).ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: tensor p{i:03} is missing", path.display()))
            })?;
            if t.dims() != shape.as_slice() {
                return Err(candle_core::Error::Msg(format!(
                    "{}: tensor p{i:03} has shape {:?}, the model needs {shape:?}",
                    path.display(),
                    t.dims()
                )));
            }
            ts.push(t);
        }
        Ok(Self::from_tensors(arch, ts.into_iter()))
    }

    /// A trainable policy starting from these weights.
    pub fn to_policy(&self) -> Result<Policy> {
        let vars = self
            .tensors()
            .into_iter()
            .map(|t| Var::from_tensor(&t.copy()?.detach()))
            .collect::<Result<Vec<_>>>()?;
        let params = Self::from_tensors(self.arch, vars.iter().map(|v| v.as_tensor().clone()));
        Ok(Policy { vars, params })
    }

    pub fn count(&self) -> usize {
        self.tensors().iter().map(|t| t.elem_count()).sum()
    }

    /// Logits (B, T, V) for tokens (B, T), T ≤ ctx; causal.
    pub fn logits(&self, tokens: &Tensor) -> Result<Tensor> {
        self.forward(tokens, &mut Vec::new())
    }

    /// Logits (B, T, V) for tokens (B, T) that follow the positions whose keys and
    /// values `cache` holds (one (K, V) pair
    /// per layer, each (B, H, past, hd); empty for none). Appends the new keys and
    /// values, so generation feeds one token at a time.
    pub fn forward(&self, tokens: &Tensor, cache: &mut Vec<(Tensor, Tensor)>) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let Arch {
            d_model: d, heads, ..
        } = self.arch;
        let hd = d / heads;
        let past = match cache.first() {
            Some((k, _)) => k.dim(2)?,
            None => 0,
        };
        let x = self.tok_emb.index_select(&tokens.flatten_all()?, 0)?;
        let x = x.reshape((b, t, d))?;
        let mut x = x.broadcast_add(&self.pos_emb.narrow(0, past, t)?)?;
        // Additive causal mask over (new, past + new): -1e9 where a key comes after the
        // query (finite, so no inf - inf in the softmax or its gradient).
        let total = past + t;
        let mask: Vec<f32> = (0..t * total)
            .map(|k| {
                if k % total > past + k / total {
                    -1e9
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, total), tokens.device())?;
        let scale = 1.0 / (hd as f64).sqrt();
        for (i, l) in self.layers.iter().enumerate() {
            let h = layer_norm(&x, &l.ln1_g, &l.ln1_b)?.reshape((b * t, d))?;
            let qkv = h.matmul(&l.w_qkv)?.reshape((b, t, 3, heads, hd))?;
            let part = |j| -> Result<Tensor> {
                qkv.narrow(2, j, 1)?
                    .squeeze(2)?
                    .transpose(1, 2)?
                    .contiguous()
            };
            let (q, mut k, mut v) = (part(0)?, part(1)?, part(2)?);
            if let Some((pk, pv)) = cache.get(i) {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            let att = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&mask)?;
            let att = softmax(&att, D::Minus1)?;
            let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b * t, d))?;
            if i < cache.len() {
                cache[i] = (k, v);
            } else {
                cache.push((k, v));
            }
            x = (x + y.matmul(&l.w_o)?.reshape((b, t, d))?)?;
            let h = layer_norm(&x, &l.ln2_g, &l.ln2_b)?.reshape((b * t, d))?;
            let h = h.matmul(&l.w_fc)?.broadcast_add(&l.b_fc)?.gelu()?;
            let h = h.matmul(&l.w_proj)?.broadcast_add(&l.b_proj)?;
            x = (x + h.reshape((b, t, d))?)?;
        }
        let h = layer_norm(&x, &self.lnf_g, &self.lnf_b)?.reshape((b * t, d))?;
        h.matmul(&self.head)?.reshape((b, t, self.arch.vocab))
    }
}

/// LayerNorm over the last dimension, from differentiable ops (candle-nn's fused
/// `layer_norm` has no backward pass).
fn layer_norm(x: &Tensor, g: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + 1e-5)?.sqrt()?)?
        .broadcast_mul(g)?
        .broadcast_add(b)
}
