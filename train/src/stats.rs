//! Small-sample statistics for comparing training runs seed by seed.
//!
//! Two arms of an experiment are run on the same seeds, so each seed gives one paired
//! difference. This module summarises those differences ([`paired`]: mean, sample sd,
//! standard error, 95% t interval, wins/losses/ties and an exact Wilcoxon signed-rank
//! p-value), corrects a family of p-values for multiple comparisons ([`holm`]), and
//! estimates trends ([`ols_slope`] for one series, [`unit_slopes`] for one slope per seed
//! summarised across seeds). It is meant for n between 2 and about 30, and has no
//! dependencies: the t quantile and the normal tail are computed here.
//!
//! Inputs are expected to be finite. Degenerate inputs (too few points, no spread in x)
//! give NaN in the affected fields rather than panicking; each function says which.

use std::f64::consts::{FRAC_2_SQRT_PI, PI, SQRT_2};

/// Summary of paired differences d_i = a_i - b_i (one per seed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    /// Number of pairs.
    pub n: usize,
    /// Mean difference (NaN when n = 0).
    pub mean: f64,
    /// Sample standard deviation of the differences, divisor n - 1 (NaN when n < 2).
    pub sd: f64,
    /// Standard error of the mean, sd / sqrt(n) (NaN when n < 2).
    pub se: f64,
    /// 95% t interval for the mean, mean ± t(0.975, n - 1) · se (NaN when n < 2).
    pub ci95: (f64, f64),
    /// Pairs with d_i > 0.
    pub wins: usize,
    /// Pairs with d_i < 0.
    pub losses: usize,
    /// Pairs with d_i = 0.
    pub ties: usize,
    /// Two-sided Wilcoxon signed-rank p-value from [`signed_rank_p`] (1.0 when n < 2).
    pub p_signed_rank: f64,
}

/// Summarises the paired differences `a[i] - b[i]`; panics if `a` and `b` differ in length.
///
/// With n < 2 the sd, se and interval are NaN and the p-value is 1.0 (n = 0 also gives a
/// NaN mean).
pub fn paired(a: &[f64], b: &[f64]) -> Paired {
    assert_eq!(
        a.len(),
        b.len(),
        "paired: the two samples must have one value per seed each"
    );
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = d.len();
    let (mean, sd) = mean_sd(&d);
    let se = sd / (n as f64).sqrt();
    let ci95 = t_interval(mean, se, n.saturating_sub(1));
    let wins = d.iter().filter(|&&x| x > 0.0).count();
    let losses = d.iter().filter(|&&x| x < 0.0).count();
    let ties = d.iter().filter(|&&x| x == 0.0).count();
    let p_signed_rank = if n < 2 { 1.0 } else { signed_rank_p(&d) };
    Paired {
        n,
        mean,
        sd,
        se,
        ci95,
        wins,
        losses,
        ties,
        p_signed_rank,
    }
}

/// The 0.975 quantile of Student's t with `df` degrees of freedom (NaN when df = 0).
///
/// Inverts the exact finite-series t distribution function (Abramowitz & Stegun 26.7.3) by
/// bisection; above 1000 df it uses the Cornish–Fisher expansion (A&S 26.7.5).
pub fn t_quantile_975(df: usize) -> f64 {
    if df == 0 {
        return f64::NAN;
    }
    if df > 1000 {
        // Standard normal 0.975 quantile; the omitted terms are below 1e-15 here.
        let z: f64 = 1.959_963_984_540_054;
        let nu = df as f64;
        let z2 = z * z;
        let g1 = z * (z2 + 1.0) / 4.0;
        let g2 = z * ((5.0 * z2 + 16.0) * z2 + 3.0) / 96.0;
        let g3 = z * (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) / 384.0;
        let g4 = z * ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) / 92160.0;
        return z + (g1 + (g2 + (g3 + g4 / nu) / nu) / nu) / nu;
    }
    // P(|T| <= sqrt(df) tan θ) increases with θ on (0, π/2); find where it reaches 0.95.
    let (mut lo, mut hi) = (0.0f64, PI / 2.0);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if t_central_mass(mid, df) < 0.95 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (df as f64).sqrt() * (0.5 * (lo + hi)).tan()
}

/// P(|T| <= sqrt(df) tan θ) for Student's t with `df` >= 1, by A&S 26.7.3 (exact for integer df).
fn t_central_mass(theta: f64, df: usize) -> f64 {
    let (s, c) = theta.sin_cos();
    let c2 = c * c;
    if df % 2 == 1 {
        if df == 1 {
            return 2.0 * theta / PI;
        }
        // cos θ + (2/3) cos³ θ + (2·4)/(3·5) cos⁵ θ + … up to cos^(df-2) θ.
        let (mut term, mut sum) = (c, c);
        for k in 1..=(df - 3) / 2 {
            term *= c2 * (2 * k) as f64 / (2 * k + 1) as f64;
            sum += term;
        }
        2.0 / PI * (theta + s * sum)
    } else {
        // 1 + (1/2) cos² θ + (1·3)/(2·4) cos⁴ θ + … up to cos^(df-2) θ.
        let (mut term, mut sum) = (1.0f64, 1.0f64);
        for k in 1..=(df - 2) / 2 {
            term *= c2 * (2 * k - 1) as f64 / (2 * k) as f64;
            sum += term;
        }
        s * sum
    }
}

/// Complementary error function for x >= 0 (about 1e-16 absolute below 2, 1e-15 relative above).
fn erfc(x: f64) -> f64 {
    if x < 2.0 {
        // erf x = 2/√π · e^(−x²) · Σ (2x²)ⁿ x / (1·3·…·(2n+1)), all terms positive.
        let (mut term, mut sum) = (x, x);
        let mut n = 0.0;
        while term > 1e-17 * sum {
            n += 1.0;
            term *= 2.0 * x * x / (2.0 * n + 1.0);
            sum += term;
        }
        1.0 - FRAC_2_SQRT_PI * (-x * x).exp() * sum
    } else {
        // erfc x = e^(−x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …)))), evaluated backwards.
        let mut f = x;
        for n in (1..=100).rev() {
            f = x + f64::from(n) / 2.0 / f;
        }
        FRAC_2_SQRT_PI / 2.0 * (-x * x).exp() / f
    }
}

/// Two-sided Wilcoxon signed-rank p-value for the differences `d` against a zero median.
///
/// Zero differences are dropped (Wilcoxon's convention) and tied |d| get average ranks.
/// With m ≤ 20 non-zero differences the p-value is exact, 2·min(P(W+ ≤ w), P(W+ ≥ w))
/// over all 2^m sign assignments, capped at 1; above that it is the normal approximation
/// with tie and continuity corrections. m = 0 gives 1.0; any NaN in `d` gives NaN.
pub fn signed_rank_p(d: &[f64]) -> f64 {
    if d.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let nz: Vec<f64> = d.iter().copied().filter(|&x| x != 0.0).collect();
    let m = nz.len();
    if m == 0 {
        return 1.0;
    }
    // Ranks of |d|, doubled so that average ranks of ties are integers.
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&i, &j| nz[i].abs().total_cmp(&nz[j].abs()));
    let mut rank2 = vec![0u64; m];
    let mut tie_sizes = Vec::new();
    let mut start = 0;
    while start < m {
        let mut end = start + 1;
        while end < m && nz[order[end]].abs() == nz[order[start]].abs() {
            end += 1;
        }
        // Positions start..end hold ranks start+1..=end; their average doubled is start+end+1.
        let avg2 = (start + end + 1) as u64;
        for &k in &order[start..end] {
            rank2[k] = avg2;
        }
        tie_sizes.push(end - start);
        start = end;
    }
    let w2: u64 = (0..m).filter(|&k| nz[k] > 0.0).map(|k| rank2[k]).sum();

    if m <= 20 {
        // Count the sign assignments by their doubled W+, one rank at a time: the full
        // enumeration of all 2^m assignments, done as a convolution so it stays cheap.
        let total2: u64 = rank2.iter().sum();
        let mut counts = vec![0u64; total2 as usize + 1];
        counts[0] = 1;
        let mut reach = 0usize;
        for &r in &rank2 {
            let r = r as usize;
            for s in (0..=reach).rev() {
                let c = counts[s];
                if c != 0 {
                    counts[s + r] += c;
                }
            }
            reach += r;
        }
        let w2 = w2 as usize;
        let le: u64 = counts[..=w2].iter().sum();
        let ge: u64 = counts[w2..].iter().sum();
        let all = (1u64 << m) as f64;
        (2.0 * le.min(ge) as f64 / all).min(1.0)
    } else {
        let mf = m as f64;
        let w = w2 as f64 / 2.0;
        let mu = mf * (mf + 1.0) / 4.0;
        let tie_term: f64 = tie_sizes
            .iter()
            .map(|&t| {
                let t = t as f64;
                t * t * t - t
            })
            .sum();
        let var = mf * (mf + 1.0) * (2.0 * mf + 1.0) / 24.0 - tie_term / 48.0;
        let z = ((w - mu).abs() - 0.5).max(0.0) / var.sqrt();
        // Two-sided normal tail: 2·(1 − Φ(z)) = erfc(z / √2).
        erfc(z / SQRT_2).min(1.0)
    }
}

/// Holm–Bonferroni adjusted p-values, in the order of the input.
///
/// The adjusted values are monotone in the raw ones and capped at 1. Inputs are expected in
/// [0, 1]; a NaN entry comes out NaN and leaves the others as if it were the largest p.
pub fn holm(p: &[f64]) -> Vec<f64> {
    let m = p.len();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&i, &j| p[i].total_cmp(&p[j]));
    let mut adjusted = vec![f64::NAN; m];
    let mut running: f64 = 0.0;
    for (rank, &i) in order.iter().enumerate() {
        if p[i].is_nan() {
            continue;
        }
        running = running.max((m - rank) as f64 * p[i]).min(1.0);
        adjusted[i] = running;
    }
    adjusted
}

/// Slope of y against x by least squares, with a 95% t interval (df = n-2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Slope {
    /// Estimated slope.
    pub slope: f64,
    /// Standard error of the slope.
    pub se: f64,
    /// 95% t interval, slope ± t(0.975, df) · se.
    pub ci95: (f64, f64),
    /// Number of points (for [`ols_slope`]) or of units (for [`unit_slopes`]).
    pub n: usize,
}

/// Least-squares slope of `y` on `x` with its standard error and 95% t interval (df = n - 2).
///
/// Panics if the lengths differ. With n < 2 or no spread in x (all x equal) every field but
/// `n` is NaN; with n = 2 the slope is exact and se and interval are NaN.
pub fn ols_slope(x: &[f64], y: &[f64]) -> Slope {
    assert_eq!(
        x.len(),
        y.len(),
        "ols_slope: x and y must have equal length"
    );
    let n = x.len();
    if n < 2 || x.iter().all(|&xi| xi == x[0]) {
        return Slope {
            slope: f64::NAN,
            se: f64::NAN,
            ci95: (f64::NAN, f64::NAN),
            n,
        };
    }
    let nf = n as f64;
    let mx = x.iter().sum::<f64>() / nf;
    let my = y.iter().sum::<f64>() / nf;
    let sxx: f64 = x.iter().map(|&xi| (xi - mx) * (xi - mx)).sum();
    let sxy: f64 = x
        .iter()
        .zip(y)
        .map(|(&xi, &yi)| (xi - mx) * (yi - my))
        .sum();
    let slope = sxy / sxx;
    let intercept = my - slope * mx;
    let sse: f64 = x
        .iter()
        .zip(y)
        .map(|(&xi, &yi)| {
            let r = yi - intercept - slope * xi;
            r * r
        })
        .sum();
    let df = n - 2;
    let se = if df == 0 {
        f64::NAN
    } else {
        (sse / df as f64 / sxx).sqrt()
    };
    Slope {
        slope,
        se,
        ci95: t_interval(slope, se, df),
        n,
    }
}

/// Per-unit slopes: each unit (seed) has y over the same x; fit one slope per unit, then
/// mean, se and 95% t interval across units (df = units - 1).
///
/// Use this for "does the paired difference grow with log2 T" with seeds as units. Panics
/// if a unit's series is not as long as `x`. `n` is the number of units; with no units every
/// other field is NaN, with one unit se and interval are NaN, and with fewer than two x
/// values or no spread in x every field but `n` is NaN.
pub fn unit_slopes(x: &[f64], ys: &[Vec<f64>]) -> Slope {
    let slopes: Vec<f64> = ys
        .iter()
        .map(|y| {
            assert_eq!(
                y.len(),
                x.len(),
                "unit_slopes: every unit needs one y per x"
            );
            ols_slope(x, y).slope
        })
        .collect();
    let n = slopes.len();
    let (mean, sd) = mean_sd(&slopes);
    let se = sd / (n as f64).sqrt();
    Slope {
        slope: mean,
        se,
        ci95: t_interval(mean, se, n.saturating_sub(1)),
        n,
    }
}

/// Mean and sample sd (divisor n - 1); NaN mean for an empty slice, NaN sd below two values.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let n = v.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, f64::NAN);
    }
    let ss: f64 = v.iter().map(|&x| (x - mean) * (x - mean)).sum();
    (mean, (ss / (n - 1) as f64).sqrt())
}

/// centre ± t(0.975, df) · se; NaN at both ends when df = 0 or se is NaN.
fn t_interval(centre: f64, se: f64, df: usize) -> (f64, f64) {
    let h = t_quantile_975(df) * se;
    (centre - h, centre + h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(got: f64, want: f64, tol: f64) {
        assert!(
            (got - want).abs() <= tol,
            "got {got}, want {want} (tol {tol})"
        );
    }

    #[test]
    fn t_quantiles_match_scipy() {
        // scipy.stats.t.ppf(0.975, df), scipy 1.17.1.
        let reference = [
            (1, 12.706204736174694),
            (2, 4.302652729749462),
            (3, 3.1824463052837078),
            (4, 2.7764451051977934),
            (5, 2.5705818356363146),
            (6, 2.4469118511449786),
            (7, 2.364624251592784),
            (9, 2.262157162798205),
            (10, 2.228138851986274),
            (15, 2.131449545559776),
            (19, 2.0930240544083087),
            (20, 2.085963447265864),
            (29, 2.045229642132703),
            (30, 2.0422724563012378),
            (50, 2.008559112100761),
            (100, 1.9839715185235518),
            // Either side of the switch to the Cornish–Fisher expansion.
            (1000, 1.9623390808264083),
            (1001, 1.9623367052808798),
            (5000, 1.9604385517065073),
            (99_999, 1.9599877077718442),
            (100_000, 1.9599877075346095),
            (100_001, 1.9599877072973786),
            (1_000_000, 1.959966356814107),
            (1_000_000_000, 1.959963986912325),
        ];
        for (df, want) in reference {
            let got = t_quantile_975(df);
            assert!(
                (got - want).abs() <= 1e-12 * want,
                "t_quantile_975({df}) = {got}, want {want}"
            );
        }
        // Textbook table values.
        close(t_quantile_975(1), 12.706, 1e-3);
        close(t_quantile_975(9), 2.262, 1e-3);
        close(t_quantile_975(19), 2.093, 1e-3);
        close(t_quantile_975(30), 2.042, 1e-3);
        assert!(t_quantile_975(0).is_nan());
    }

    #[test]
    fn erfc_matches_scipy() {
        // scipy.special.erfc(x), scipy 1.17.1; both sides of the switch at x = 2.
        let reference = [
            (0.0, 1.0),
            (0.1, 0.8875370839817152),
            (0.5, 0.4795001221869535),
            (1.0, 0.15729920705028516),
            (1.5, 0.03389485352468927),
            (1.9, 0.007209570764742531),
            (2.0, 0.004677734981047266),
            (2.9, 4.109787809945884e-05),
            (3.0, 2.2090496998585445e-05),
            (3.5, 7.430983723414129e-07),
            (5.0, 1.5374597944280347e-12),
            (8.0, 1.1224297172982928e-29),
        ];
        for (x, want) in reference {
            let got = erfc(x);
            assert!(
                ((got - want) / want).abs() < 1e-13,
                "erfc({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn signed_rank_all_positive_ten() {
        // scipy.stats.wilcoxon(np.arange(1, 11), method='exact').pvalue == 0.001953125 == 2/1024.
        let d: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(signed_rank_p(&d), 2.0 / 1024.0);
        let neg: Vec<f64> = d.iter().map(|x| -x).collect();
        assert_eq!(signed_rank_p(&neg), 2.0 / 1024.0);
    }

    #[test]
    fn signed_rank_mixed_no_ties() {
        // scipy.stats.wilcoxon([1.5, -0.3, 2.1, 0.8, -1.2, 3.0, 0.4, -0.9, 1.7],
        //     method='exact').pvalue == 0.1640625
        let d = [1.5, -0.3, 2.1, 0.8, -1.2, 3.0, 0.4, -0.9, 1.7];
        close(signed_rank_p(&d), 0.1640625, 1e-12);
        // m = 20, the largest exact case: scipy.stats.wilcoxon(d, method='exact').pvalue for
        // d = [-k if k % 3 == 0 else k for k in range(1, 21)] == 0.1230926513671875 and for
        // d = [k if k % 2 == 0 else -k for k in range(1, 21)] == 0.8694877624511719.
        let d3: Vec<f64> = (1..=20)
            .map(|k| {
                if k % 3 == 0 {
                    -f64::from(k)
                } else {
                    f64::from(k)
                }
            })
            .collect();
        close(signed_rank_p(&d3), 0.1230926513671875, 1e-15);
        let d2: Vec<f64> = (1..=20)
            .map(|k| {
                if k % 2 == 0 {
                    f64::from(k)
                } else {
                    -f64::from(k)
                }
            })
            .collect();
        close(signed_rank_p(&d2), 0.8694877624511719, 1e-15);
    }

    #[test]
    fn signed_rank_ties_and_zeros() {
        // scipy.stats.wilcoxon(d, zero_method='wilcox',
        //     method=scipy.stats.PermutationMethod(n_resamples=10**6)).pvalue == 0.05859375
        // (exact: 2^9 sign flips < n_resamples); a separate brute force over all 2^9
        // assignments in Python (average ranks via scipy.stats.rankdata) agrees.
        let d = [0.0, 0.0, 1.0, -1.0, 2.0, 2.0, -3.0, 4.0, 4.0, 4.0, 5.0];
        close(signed_rank_p(&d), 0.05859375, 1e-12);
        // Same scipy call and brute force for [0.5, -0.5, 0.5, 1.0, 1.0, -2.0, 0.0, 3.0]: 0.328125.
        let d2 = [0.5, -0.5, 0.5, 1.0, 1.0, -2.0, 0.0, 3.0];
        close(signed_rank_p(&d2), 0.328125, 1e-12);
    }

    #[test]
    fn signed_rank_degenerate() {
        assert_eq!(signed_rank_p(&[]), 1.0);
        assert_eq!(signed_rank_p(&[0.0, 0.0, 0.0]), 1.0);
        // One non-zero difference: the tails have probability 1/2 and 1, so p = 1.
        assert_eq!(signed_rank_p(&[0.0, 2.0]), 1.0);
        assert!(signed_rank_p(&[1.0, f64::NAN]).is_nan());
    }

    #[test]
    fn signed_rank_normal_approximation() {
        // m = 25 with ties: scipy.stats.wilcoxon(d, zero_method='wilcox', method='approx',
        //     correction=True).pvalue == 0.8083651559145103
        // (d = np.round(np.random.default_rng(7).normal(0.4, 1.0, 25), 1)).
        let d = [
            0.4, 0.7, 0.1, -0.5, -0.1, -0.6, 0.5, 1.7, -0.1, -0.2, 0.9, 0.8, 0.5, -0.5, 0.4, 1.1,
            -0.9, -0.1, -1.5, -0.9, -1.4, 0.2, -0.9, 0.7, 0.6,
        ];
        close(signed_rank_p(&d), 0.8083651559145103, 1e-9);
    }

    #[test]
    fn paired_matches_scipy() {
        // d = a - b; scipy.stats.ttest_rel(a, b): statistic 2.7014574474578597,
        // .confidence_interval(0.95) == (0.004364000575456613, 0.0656359994245434);
        // numpy: mean 0.035, d.std(ddof=1) 0.03664501525251617, se 0.012955969390869324.
        // Signed rank (one zero dropped, two tied at -0.01), brute force over 2^7: 0.078125.
        let a = [0.61, 0.55, 0.70, 0.58, 0.66, 0.52, 0.63, 0.59];
        let b = [0.57, 0.56, 0.62, 0.51, 0.60, 0.52, 0.58, 0.60];
        let s = paired(&a, &b);
        assert_eq!(s.n, 8);
        close(s.mean, 0.035, 1e-12);
        close(s.sd, 0.03664501525251617, 1e-12);
        close(s.se, 0.012955969390869324, 1e-12);
        close(s.mean / s.se, 2.7014574474578597, 1e-9);
        close(s.ci95.0, 0.004364000575456613, 1e-9);
        close(s.ci95.1, 0.0656359994245434, 1e-9);
        assert_eq!((s.wins, s.losses, s.ties), (5, 2, 1));
        close(s.p_signed_rank, 0.078125, 1e-12);
    }

    #[test]
    fn paired_degenerate() {
        let one = paired(&[1.0], &[0.5]);
        assert_eq!(one.n, 1);
        assert_eq!(one.mean, 0.5);
        assert!(one.sd.is_nan() && one.se.is_nan());
        assert!(one.ci95.0.is_nan() && one.ci95.1.is_nan());
        assert_eq!(one.p_signed_rank, 1.0);
        assert_eq!((one.wins, one.losses, one.ties), (1, 0, 0));

        let none = paired(&[], &[]);
        assert_eq!(none.n, 0);
        assert!(none.mean.is_nan());
        assert_eq!(none.p_signed_rank, 1.0);

        // No spread: the interval collapses onto the mean.
        let flat = paired(&[2.0, 3.0, 4.0], &[1.0, 2.0, 3.0]);
        assert_eq!(flat.sd, 0.0);
        assert_eq!(flat.ci95, (1.0, 1.0));
    }

    #[test]
    #[should_panic(expected = "one value per seed")]
    fn paired_panics_on_length_mismatch() {
        paired(&[1.0, 2.0], &[1.0]);
    }

    #[test]
    fn holm_hand_worked() {
        // Sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → max so far 0.06.
        let adj = holm(&[0.01, 0.04, 0.03, 0.005]);
        for (g, w) in adj.iter().zip([0.03, 0.06, 0.06, 0.02]) {
            close(*g, w, 1e-12);
        }
        // Sorted: 0.01·3 = 0.03, 0.2·2 = 0.4, 0.9·1 = 0.9.
        let adj = holm(&[0.2, 0.9, 0.01]);
        for (g, w) in adj.iter().zip([0.4, 0.9, 0.03]) {
            close(*g, w, 1e-12);
        }
        // Capped at 1: 0.5·2 = 1.0, then max(1.0, 0.6) = 1.0.
        assert_eq!(holm(&[0.6, 0.5]), vec![1.0, 1.0]);
        assert_eq!(holm(&[0.7]), vec![0.7]);
        assert!(holm(&[]).is_empty());
    }

    #[test]
    fn ols_known_slope() {
        // Exact line y = 2x + 1: slope 2, zero standard error.
        let x = [0.0, 1.0, 2.0, 3.0, 4.0];
        let y: Vec<f64> = x.iter().map(|v| 2.0 * v + 1.0).collect();
        let s = ols_slope(&x, &y);
        assert_eq!(s.n, 5);
        close(s.slope, 2.0, 1e-12);
        close(s.se, 0.0, 1e-12);
        close(s.ci95.0, 2.0, 1e-12);
        close(s.ci95.1, 2.0, 1e-12);
    }

    #[test]
    fn ols_matches_linregress() {
        // r = scipy.stats.linregress(x, y): slope 1.9857142857142858, stderr 0.03614031611621056;
        // ci = r.slope ± scipy.stats.t.ppf(0.975, 5) * r.stderr
        //    = (1.8928126455718006, 2.078615925856771).
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0];
        let y = [2.1, 3.9, 6.2, 7.8, 10.1, 12.2, 13.8];
        let s = ols_slope(&x, &y);
        assert_eq!(s.n, 7);
        close(s.slope, 1.9857142857142858, 1e-12);
        close(s.se, 0.03614031611621056, 1e-12);
        close(s.ci95.0, 1.8928126455718006, 1e-9);
        close(s.ci95.1, 2.078615925856771, 1e-9);
    }

    #[test]
    fn ols_degenerate() {
        let flat = ols_slope(&[3.0, 3.0, 3.0], &[1.0, 2.0, 3.0]);
        assert_eq!(flat.n, 3);
        assert!(flat.slope.is_nan() && flat.se.is_nan() && flat.ci95.0.is_nan());
        assert!(ols_slope(&[1.0], &[1.0]).slope.is_nan());
        let two = ols_slope(&[1.0, 3.0], &[0.0, 1.0]);
        assert_eq!(two.slope, 0.5);
        assert!(two.se.is_nan() && two.ci95.1.is_nan());
    }

    #[test]
    fn unit_slopes_constructed_exact() {
        // Units are exact lines with slopes 0.5, 1.0, 1.5, 2.0 and arbitrary intercepts:
        // mean 1.25, sd sqrt(5/12), se sqrt(5/12)/2, ci 1.25 ± t.ppf(0.975, 3)·se.
        let x = [3.0, 4.0, 5.0, 6.0];
        let ys: Vec<Vec<f64>> = [(0.5, 1.0), (1.0, -2.0), (1.5, 0.0), (2.0, 0.3)]
            .iter()
            .map(|&(b, c)| x.iter().map(|v| b * v + c).collect())
            .collect();
        let s = unit_slopes(&x, &ys);
        assert_eq!(s.n, 4);
        close(s.slope, 1.25, 1e-12);
        let se = (5.0f64 / 12.0).sqrt() / 2.0;
        close(s.se, se, 1e-12);
        // scipy.stats.t.ppf(0.975, 3) == 3.1824463052837078
        close(s.ci95.0, 1.25 - 3.1824463052837078 * se, 1e-9);
        close(s.ci95.1, 1.25 + 3.1824463052837078 * se, 1e-9);
    }

    #[test]
    fn unit_slopes_match_scipy() {
        // slopes = [scipy.stats.linregress(x, y).slope for y in ys]
        //        == [0.053, 0.01, 0.049, 0.03, 0.02];
        // r = scipy.stats.ttest_1samp(slopes, 0): mean 0.0324, se 0.008249848483457133,
        // r.confidence_interval(0.95) == (0.009494748559482, 0.055305251440518).
        let x = [3.0, 4.0, 5.0, 6.0];
        let ys = vec![
            vec![0.10, 0.14, 0.22, 0.25],
            vec![0.02, 0.01, 0.05, 0.04],
            vec![-0.03, 0.02, 0.06, 0.12],
            vec![0.05, 0.04, 0.10, 0.13],
            vec![0.00, 0.03, 0.02, 0.07],
        ];
        let s = unit_slopes(&x, &ys);
        assert_eq!(s.n, 5);
        close(s.slope, 0.0324, 1e-12);
        close(s.se, 0.008249848483457133, 1e-12);
        close(s.ci95.0, 0.009494748559482, 1e-9);
        close(s.ci95.1, 0.055305251440518, 1e-9);
    }

    #[test]
    fn unit_slopes_degenerate() {
        let x = [1.0, 2.0, 3.0];
        let none = unit_slopes(&x, &[]);
        assert_eq!(none.n, 0);
        assert!(none.slope.is_nan() && none.se.is_nan());
        let one = unit_slopes(&x, &[vec![1.0, 2.0, 3.0]]);
        assert_eq!(one.n, 1);
        close(one.slope, 1.0, 1e-12);
        assert!(one.se.is_nan() && one.ci95.0.is_nan());
        let flat = unit_slopes(&[2.0, 2.0], &[vec![1.0, 2.0], vec![0.0, 1.0]]);
        assert_eq!(flat.n, 2);
        assert!(flat.slope.is_nan() && flat.ci95.1.is_nan());
    }
}
