//! `cppo-train`: the command-line front of the trainer in [`cppo_train`].

use clap::Parser;

fn main() {
    // One thread per run: candle's matrix products are too small here to gain from
    // threads, and runs in parallel use the cores better. candle reads this variable.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "1") };
    }
    if let Err(e) = cppo_train::run(cppo_train::Args::parse()) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
