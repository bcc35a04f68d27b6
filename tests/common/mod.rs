//! Shared by the integration tests:
//!
//! - [`cases`]: one batch held as owned arrays, with its config;
//! - [`reference`]: a plain per-token implementation of the crate's math, written from
//!   its specification with its own loops and formulas, one file per concept;
//! - [`strategies`]: proptest strategies for valid cases and configs;
//! - [`compare`]: closeness and bit-for-bit comparisons;
//! - [`rng`]: the tests' one hash for deterministic values.
//!
//! Each test binary uses a different part of this module.
#![allow(dead_code, unused_imports)]

pub mod cases;
pub mod compare;
pub mod reference;
pub mod rng;
pub mod strategies;

pub use cases::*;
pub use compare::*;
pub use reference::divergence::*;
pub use reference::objective::*;
pub use reference::rule::*;
pub use reference::{Reference, ref_agg_weight, reference};
pub use rng::*;
pub use strategies::*;
