//! One batch held as owned arrays, with its config, and the edits tests make to it.

use cppo::ndarray::{Array1, Array2, Array3};
use cppo::{Batch, Config, Evaluation, Float, Par, evaluate};

use super::rng::{garbage_value, mix};

/// The advantages of a case: one per row, or one per token.
#[derive(Clone, Debug)]
pub enum Adv<F> {
    /// (B,), broadcast along each row.
    Row(Array1<F>),
    /// (B, L).
    Token(Array2<F>),
}

/// One batch as owned arrays, with the config to evaluate it under.
#[derive(Clone, Debug)]
pub struct Case<F> {
    pub cfg: Config,
    pub logp: Array2<F>,
    pub logp_old: Array2<F>,
    pub adv: Adv<F>,
    pub mask: Array2<bool>,
    /// (topk_logp_old, topk_logp), each (B, L, K).
    pub topk: Option<(Array3<F>, Array3<F>)>,
    pub logp_ref: Option<Array2<F>>,
    pub is_weights: Option<Array2<F>>,
}

/// The input arrays of a case, by name (for tests that poke values into one array).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Arr {
    Logp,
    LogpOld,
    Adv,
    TopkOld,
    TopkNew,
    LogpRef,
    IsWeights,
}

impl Arr {
    pub const ALL: [Arr; 7] = [
        Arr::Logp,
        Arr::LogpOld,
        Arr::Adv,
        Arr::TopkOld,
        Arr::TopkNew,
        Arr::LogpRef,
        Arr::IsWeights,
    ];

    /// The name the crate's errors use.
    pub fn name(self) -> &'static str {
        match self {
            Arr::Logp => "logp",
            Arr::LogpOld => "logp_old",
            Arr::Adv => "advantages",
            Arr::TopkOld => "topk_logp_old",
            Arr::TopkNew => "topk_logp",
            Arr::LogpRef => "logp_ref",
            Arr::IsWeights => "is_weights",
        }
    }

    pub fn is_logprob(self) -> bool {
        !matches!(self, Arr::Adv | Arr::IsWeights)
    }
}

impl<F: Float> Case<F> {
    /// (B, L).
    pub fn shape(&self) -> (usize, usize) {
        self.logp.dim()
    }

    /// K, if the case has top-K arrays.
    pub fn k(&self) -> Option<usize> {
        self.topk.as_ref().map(|(o, _)| o.dim().2)
    }

    /// The advantage at (i, j), widened.
    pub fn adv_at(&self, i: usize, j: usize) -> f64 {
        match &self.adv {
            Adv::Row(a) => a[i].to_f64(),
            Adv::Token(a) => a[[i, j]].to_f64(),
        }
    }

    /// The batch, with the bool mask. Panics on a shape error (cases are well formed).
    pub fn batch(&self) -> Batch<'_, F> {
        self.batch_with_mask(&self.mask)
    }

    /// The batch with another mask array (of any mask element type).
    pub fn batch_with_mask<'a>(&'a self, mask: impl Into<cppo::Mask<'a>>) -> Batch<'a, F> {
        let b = match &self.adv {
            Adv::Row(a) => Batch::new(&self.logp, &self.logp_old, a, mask),
            Adv::Token(a) => Batch::new(&self.logp, &self.logp_old, a, mask),
        }
        .expect("case shapes are consistent");
        let b = match &self.topk {
            Some((old, new)) => b.with_topk(old, new).expect("top-K shapes"),
            None => b,
        };
        let b = match &self.logp_ref {
            Some(r) => b.with_logp_ref(r).expect("logp_ref shape"),
            None => b,
        };
        match &self.is_weights {
            Some(w) => b.with_is_weights(w).expect("is_weights shape"),
            None => b,
        }
    }

    /// `evaluate` under the case's own config.
    pub fn eval(&self, par: Par) -> cppo::Result<Evaluation<F>> {
        evaluate(&self.cfg, &self.batch(), par)
    }

    /// The same case in another float type (each value rounded once).
    pub fn cast<G: Float>(&self) -> Case<G> {
        let c2 = |a: &Array2<F>| a.mapv(|x| G::from_f64(x.to_f64()));
        let c3 = |a: &Array3<F>| a.mapv(|x| G::from_f64(x.to_f64()));
        Case {
            cfg: self.cfg,
            logp: c2(&self.logp),
            logp_old: c2(&self.logp_old),
            adv: match &self.adv {
                Adv::Row(a) => Adv::Row(a.mapv(|x| G::from_f64(x.to_f64()))),
                Adv::Token(a) => Adv::Token(c2(a)),
            },
            mask: self.mask.clone(),
            topk: self.topk.as_ref().map(|(o, n)| (c3(o), c3(n))),
            logp_ref: self.logp_ref.as_ref().map(c2),
            is_weights: self.is_weights.as_ref().map(c2),
        }
    }

    /// Sets one value of one input array; `k` is used by the top-K arrays only, and the
    /// column by per-token advantages only. Returns false when the case lacks the array.
    pub fn set(&mut self, arr: Arr, i: usize, j: usize, k: usize, v: F) -> bool {
        let slot = |a: &mut Option<Array2<F>>| match a {
            Some(r) => {
                r[[i, j]] = v;
                true
            }
            None => false,
        };
        match arr {
            Arr::Logp => self.logp[[i, j]] = v,
            Arr::LogpOld => self.logp_old[[i, j]] = v,
            Arr::Adv => match &mut self.adv {
                Adv::Row(a) => a[i] = v,
                Adv::Token(a) => a[[i, j]] = v,
            },
            Arr::TopkOld | Arr::TopkNew => match &mut self.topk {
                Some((o, n)) => {
                    let a = if arr == Arr::TopkOld { o } else { n };
                    a[[i, j, k]] = v;
                }
                None => return false,
            },
            Arr::LogpRef => return slot(&mut self.logp_ref),
            Arr::IsWeights => return slot(&mut self.is_weights),
        }
        true
    }

    /// Overwrites every value that sits at a non-response position (and, for per-row
    /// advantages, the advantage of every row without response tokens) with `f(arr, i,
    /// j, k)`.
    pub fn fill_padding(&mut self, f: impl Fn(Arr, usize, usize, usize) -> F) {
        let (b, l) = self.shape();
        let kk = self.k().unwrap_or(0);
        for i in 0..b {
            let empty = (0..l).all(|j| !self.mask[[i, j]]);
            if empty && let Adv::Row(a) = &mut self.adv {
                a[i] = f(Arr::Adv, i, 0, 0);
            }
            for j in 0..l {
                if self.mask[[i, j]] {
                    continue;
                }
                for arr in Arr::ALL {
                    match arr {
                        Arr::TopkOld | Arr::TopkNew => {
                            for k in 0..kk {
                                self.set(arr, i, j, k, f(arr, i, j, k));
                            }
                        }
                        Arr::Adv if matches!(self.adv, Adv::Row(_)) => {}
                        _ => {
                            self.set(arr, i, j, 0, f(arr, i, j, 0));
                        }
                    }
                }
            }
        }
    }

    /// [`Case::fill_padding`] with the garbage trainers leave, chosen by `seed`.
    pub fn fill_garbage(&mut self, seed: u64) {
        self.fill_padding(|arr, i, j, k| F::from_f64(garbage(seed, arr, i, j, k)));
    }

    /// The same case with its rows in the order `perm` (row r of the result is row
    /// `perm[r]` of this one).
    pub fn permute_rows(&self, perm: &[usize]) -> Case<F> {
        let p2 = |a: &Array2<F>| Array2::from_shape_fn(a.dim(), |(i, j)| a[[perm[i], j]]);
        let p3 = |a: &Array3<F>| Array3::from_shape_fn(a.dim(), |(i, j, k)| a[[perm[i], j, k]]);
        Case {
            cfg: self.cfg,
            logp: p2(&self.logp),
            logp_old: p2(&self.logp_old),
            adv: match &self.adv {
                Adv::Row(a) => Adv::Row(Array1::from_shape_fn(a.len(), |i| a[perm[i]])),
                Adv::Token(a) => Adv::Token(p2(a)),
            },
            mask: Array2::from_shape_fn(self.mask.dim(), |(i, j)| self.mask[[perm[i], j]]),
            topk: self.topk.as_ref().map(|(o, n)| (p3(o), p3(n))),
            logp_ref: self.logp_ref.as_ref().map(p2),
            is_weights: self.is_weights.as_ref().map(p2),
        }
    }

    /// Response tokens per row.
    pub fn row_lengths(&self) -> Vec<usize> {
        self.mask
            .rows()
            .into_iter()
            .map(|r| r.iter().filter(|&&m| m).count())
            .collect()
    }
}

/// A garbage value chosen by a hash of (seed, array, i, j, k).
pub fn garbage(seed: u64, arr: Arr, i: usize, j: usize, k: usize) -> f64 {
    garbage_value(mix(seed
        ^ mix((arr as u64) << 48
            ^ (i as u64) << 24
            ^ (j as u64) << 8
            ^ k as u64)))
}

/// The worked example's config: CPPO on binary TV with δ = 0.2, a fixed δ_b = 0.05 and
/// w_min = 0.8, surrogate, token-mean.
pub fn worked_example_config() -> Config {
    Config::with_rule(cppo::Rule::Cppo(cppo::CppoParams {
        delta: 0.2,
        delta_b: Some(0.05),
        w_min: 0.8,
        calibration: None,
        ..cppo::CppoParams::default()
    }))
}
