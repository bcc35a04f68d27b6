//! The tests' one source of deterministic numbers: SplitMix64 as a hash, for values
//! chosen by position (garbage in padding, large batches from a seed). Batches for
//! demos and benchmarks come from the crate's own `cppo::synth`.

/// SplitMix64's output function.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform in [0, 1) from a hash.
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A stream of uniforms in [0, 1) from a seed.
pub struct Stream(u64);

impl Stream {
    pub fn new(seed: u64) -> Self {
        Self(mix(seed))
    }

    /// The next uniform in [0, 1).
    pub fn next_unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(1);
        unit(mix(self.0))
    }

    /// The next integer in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix(self.0) % n.max(1)
    }
}

/// The values trainers leave in padding.
pub const GARBAGE: [f64; 12] = [
    f64::NAN,
    f64::NEG_INFINITY,
    f64::INFINITY,
    1e30,
    -1e30,
    5.0,
    -0.0,
    0.0,
    5e-5,
    -3.0,
    -f64::NAN,
    f64::MIN_POSITIVE,
];

/// A garbage value from a hash.
pub fn garbage_value(h: u64) -> f64 {
    GARBAGE[(h % GARBAGE.len() as u64) as usize]
}
