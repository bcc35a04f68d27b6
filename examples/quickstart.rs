//! Three token-level trust regions on one realistic batch.
//!
//! Run with `cargo run --release --features synth --example quickstart`.

use cppo::synth::{SynthSpec, SyntheticBatch};
use cppo::{Config, Evaluation, Par, Reason, evaluate};

const ABOUT: &str = "\
A synthetic GRPO batch (64 responses of up to 512 tokens, padded, with tool-output holes)
in which the current policy has drifted off the rollout policy, more on early tokens than
on late ones. Each rule below decides, token by token, which gradients to keep. GRPO's
ratio clip masks tokens whose ratio pi/mu left [0.8, 1.2] in the direction of their
advantage; DPPO masks those whose probability moved by more than delta = 0.2 (binary TV);
CPPO weights that test by position (w_t D_t <= delta, w_t falling from 1 to 0.8, so early
tokens are held tighter) and adds a prefix budget S_t <= delta + delta_b W_(t-1) that
caps how far a whole prefix may drift. Under every rule, a token whose update moves back
toward the rollout policy keeps its gradient (the corrective bypass). The first table
counts response tokens by reason, the second gives the masked fraction by relative
position in the response (tenths of each row's length).";

fn main() -> Result<(), cppo::Error> {
    let spec = SynthSpec {
        rows: 64,
        len: 512,
        ..SynthSpec::default()
    };
    let data = SyntheticBatch::<f32>::generate(&spec);
    let batch = data.batch()?;

    let rules = [
        ("GRPO ratio clip", Config::grpo()),
        ("DPPO", Config::dppo()),
        ("CPPO", Config::cppo()),
    ];
    let evals = rules
        .iter()
        .map(|(_, cfg)| evaluate(cfg, &batch, Par::Rayon))
        .collect::<Result<Vec<Evaluation<f32>>, _>>()?;

    println!("{ABOUT}\n");
    let d = &evals[2].diagnostics;
    println!(
        "Batch: {} rows x {} slots, {} response tokens ({:.1}% of slots), seed {}.",
        spec.rows,
        spec.len,
        d.response_tokens,
        100.0 * d.response_tokens as f64 / (spec.rows * spec.len) as f64,
        spec.seed,
    );
    println!(
        "Binary TV divergence: mean {:.4}, max {:.3}; ratio pi/mu in [{:.3}, {:.1}].\n",
        d.divergence_mean, d.divergence_max, d.ratio_min, d.ratio_max,
    );

    println!(
        "{:<16} {:>8} {:>8} | {:>9} {:>9} {:>10} {:>10}",
        "rule", "masked", "masked%", "feasible", "bypass", "token thr", "prefix bud"
    );
    println!("{}", "-".repeat(80));
    for ((name, _), e) in rules.iter().zip(&evals) {
        let by = |r: Reason| e.tally.by_reason[r as usize];
        println!(
            "{:<16} {:>8} {:>7.2}% | {:>9} {:>9} {:>10} {:>10}",
            name,
            e.tally.masked(),
            100.0 * e.diagnostics.masked_frac,
            by(Reason::Feasible),
            by(Reason::Corrective),
            by(Reason::TokenThreshold),
            by(Reason::PrefixBudget),
        );
    }

    println!("\nMasked fraction by position in the response");
    print!("{:<10}", "position");
    for (name, _) in &rules {
        print!(" {name:>16}");
    }
    println!();
    println!("{}", "-".repeat(10 + 17 * rules.len()));
    for k in 0..10 {
        print!("{:<10}", format!("{:>3}-{:>3}%", 10 * k, 10 * (k + 1)));
        for e in &evals {
            print!(" {:>15.2}%", 100.0 * e.diagnostics.masked_frac_by_decile[k]);
        }
        println!();
    }
    Ok(())
}
