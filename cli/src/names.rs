//! The names a batch file's arrays go by: the crate's, verl's or TRL's (`--names`), and
//! the one-line error for a missing array, with what to do.
//!
//! `--names` ([`Names`]) says which names the file's arrays go by: the crate's
//! (`logp`, `logp_old`, ...; the default), verl's or TRL's. [`NAME_TABLE`] is the one
//! table of them: for each array, the names each trainer gives it, looked for in order
//! (the first the file holds is read); an array a trainer has no name for keeps the
//! crate's. A missing array is one line that also lists what the file holds (each
//! array's shape and dtype, from its header alone) and, when the names the file uses
//! say how, what to do: rerun with `--names verl` or `--names trl`, name positional
//! arrays (`arr_0`, `arr_1`, ...) with keyword arguments, or save the batch under the
//! crate's names. Errors about values name the crate's arrays; under `--names verl` or
//! `trl` they say which of the file's arrays each was read from.

use crate::batchfile::{Format, Source};
use crate::failure::Failure;

/// `--names`: the convention the file's array names follow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Names {
    /// The crate's: logp, logp_old, advantages, mask, topk_logp_old, topk_logp, logp_ref,
    /// is_weights.
    #[default]
    Crate,
    /// verl's batch keys (DataProto): old_log_probs, response_mask, ref_log_prob, ...
    Verl,
    /// TRL GRPOTrainer's: per_token_logps, old_per_token_logps, completion_mask, ...
    Trl,
}

impl Names {
    const ALL: [Self; 3] = [Self::Crate, Self::Verl, Self::Trl];

    /// The value of `--names`.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Crate => "crate",
            Self::Verl => "verl",
            Self::Trl => "trl",
        }
    }

    /// The names an array of the crate (`logp`, ...) is looked for under, in order.
    pub fn candidates(self, array: &str) -> &'static [&'static str] {
        let Some(row) = NAME_TABLE.iter().find(|r| r.array == array) else {
            return &[];
        };
        let names = match self {
            Self::Crate => &[][..],
            Self::Verl => row.verl,
            Self::Trl => row.trl,
        };
        if names.is_empty() {
            std::slice::from_ref(&row.array)
        } else {
            names
        }
    }

    /// The name the file holds `array` under, if it holds it.
    pub(crate) fn find(self, src: &impl Source, array: &str) -> Option<&'static str> {
        self.candidates(array).iter().copied().find(|n| src.has(n))
    }

    /// Whether `name` is one of this convention's names.
    fn uses(self, name: &str) -> bool {
        NAME_TABLE
            .iter()
            .any(|r| self.candidates(r.array).contains(&name))
    }
}

/// One array the tool reads: the crate's name, and the names verl and TRL give it, in
/// the order they are looked for (empty: the trainer has none, the crate's is used).
#[derive(Debug)]
pub struct NameRow {
    pub array: &'static str,
    pub verl: &'static [&'static str],
    pub trl: &'static [&'static str],
}

/// The names of every array the tool reads, by convention: the one table `--names`
/// reads, the hints of a missing array and `--names`' help are made from.
///
/// verl: the batch keys `DataParallelPPOActor.update_policy` (`dp_actor.py`) reads:
/// `old_log_probs` (the actor's recomputed log-probs, the anchor of verl's own clip; in
/// bypass mode verl sets it to the rollout engine's `rollout_log_probs`), `advantages`,
/// `response_mask`, `ref_log_prob`, `rollout_is_weights`, `rollout_log_probs`; the current
/// log-probs are `log_prob` there (`outputs["log_probs"]`). `rollout_log_probs` (μ, the
/// inference engine's log-probs, recorded with `rollout.calculate_log_probs=True`) is
/// read as `logp_old` only when the file has no `old_log_probs`: with both, the trust
/// region is anchored where verl anchors its own. To anchor on the rollout engine's
/// log-probs instead, dump `rollout_log_probs` without `old_log_probs`.
///
/// TRL: the keys of `GRPOTrainer._compute_loss`'s `inputs` (`old_per_token_logps`,
/// `completion_mask`, `advantages`, `ref_per_token_logps`, and vLLM's
/// `sampling_per_token_logps`, read as `logp_old` only without `old_per_token_logps`)
/// and its local `per_token_logps`.
pub static NAME_TABLE: [NameRow; 8] = [
    NameRow {
        array: "logp",
        verl: &["log_prob", "log_probs"],
        trl: &["per_token_logps"],
    },
    NameRow {
        array: "logp_old",
        verl: &["old_log_probs", "old_log_prob", "rollout_log_probs"],
        trl: &["old_per_token_logps", "sampling_per_token_logps"],
    },
    NameRow {
        array: "advantages",
        verl: &["advantages"],
        trl: &["advantages"],
    },
    NameRow {
        array: "mask",
        verl: &["response_mask"],
        trl: &["completion_mask"],
    },
    NameRow {
        array: "topk_logp_old",
        verl: &[],
        trl: &[],
    },
    NameRow {
        array: "topk_logp",
        verl: &[],
        trl: &[],
    },
    NameRow {
        array: "logp_ref",
        verl: &["ref_log_prob"],
        trl: &["ref_per_token_logps"],
    },
    NameRow {
        array: "is_weights",
        verl: &["rollout_is_weights"],
        trl: &[],
    },
];

/// The four arrays every config reads.
const REQUIRED: [&str; 4] = ["logp", "logp_old", "advantages", "mask"];

/// `--names`' long help, made from [`NAME_TABLE`].
pub fn names_help() -> String {
    let mut help = String::from(
        "The names the batch file's arrays go by: crate (the default: logp, logp_old, \
         advantages, mask, ...), verl (verl's batch keys) or trl (TRL GRPOTrainer's). \
         Where several names are given, the first the file holds is read; an array a \
         trainer has no name for keeps the crate's name.\n",
    );
    for row in &NAME_TABLE {
        let list = |n: Names| Names::candidates(n, row.array).join(" | ");
        help.push_str(&format!(
            "\n  {:<14} verl: {}; trl: {}",
            row.array,
            list(Names::Verl),
            list(Names::Trl)
        ));
    }
    help
}

/// How arrays are looked up: under which convention's names.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lookup {
    pub(crate) names: Names,
}

/// The most arrays a missing-array message lists.
const MAX_LISTED: usize = 12;

/// A name for a message: at most 64 characters.
fn shown(name: &str) -> String {
    if name.chars().count() <= 64 {
        name.to_string()
    } else {
        let head: String = name.chars().take(61).collect();
        format!("{head}...")
    }
}

/// A shape as Python spells it: `(2, 6)`, `(2,)`, `()`.
fn py_shape(shape: &[usize]) -> String {
    match shape {
        [n] => format!("({n},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

/// `a`, `a or b`, `a, b or c`.
fn or_list(names: &[&str]) -> String {
    match names {
        [] => String::new(),
        [one] => (*one).to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// How the file would be saved with the crate's names.
fn save_hint(format: Format) -> &'static str {
    match format {
        Format::Npz => "np.savez(path, logp=..., logp_old=..., advantages=..., mask=...)",
        Format::Safetensors => {
            "safetensors.torch.save_file({\"logp\": ..., \"logp_old\": ..., \
             \"advantages\": ..., \"mask\": ...}, path)"
        }
    }
}

/// Whether a name is one numpy gives a positional argument of `np.savez`.
fn positional(name: &str) -> bool {
    name.strip_prefix("arr_")
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// What to do about a missing `array`, given the names the file holds.
fn missing_hint(held: &[String], lookup: Lookup, array: &str, format: Format) -> Option<String> {
    let has = |n: &str| held.iter().any(|h| h == n);
    let resolves = |c: Names, a: &str| c.candidates(a).iter().any(|n| has(n));
    // Another convention under which this array and the four required ones are found,
    // the one most of whose own names the file holds.
    let convention = Names::ALL
        .into_iter()
        .filter(|&c| c != lookup.names)
        .filter(|&c| resolves(c, array) && REQUIRED.iter().all(|a| resolves(c, a)))
        .map(|c| {
            let own: Vec<&str> = held
                .iter()
                .map(String::as_str)
                .filter(|n| c.uses(n) && !lookup.names.uses(n))
                .collect();
            (c, own)
        })
        .filter(|(_, own)| !own.is_empty())
        .max_by_key(|(c, own)| (own.len(), std::cmp::Reverse(*c as u8)));
    if let Some((c, own)) = convention {
        let more = if own.len() > 3 { ", ..." } else { "" };
        let own: Vec<String> = own.iter().take(3).map(|n| shown(n)).collect();
        let own = format!("({}{more})", own.join(", "));
        return Some(match c {
            Names::Crate => {
                format!("the file uses cppo's own names {own}: rerun without --names")
            }
            _ => format!(
                "the file looks like a {} dump {own}: rerun with --names {}, or save it \
                 with {}",
                c.label(),
                c.flag(),
                save_hint(format)
            ),
        });
    }
    // Another convention's name for this array alone.
    for c in Names::ALL.into_iter().filter(|&c| c != lookup.names) {
        if let Some(n) = c.candidates(array).iter().find(|n| has(n)) {
            return Some(format!(
                "{n} is {}'s name for {array}: save it as {array}",
                c.label()
            ));
        }
    }
    if !held.is_empty() && held.iter().all(|n| positional(n)) && format == Format::Npz {
        return Some(format!(
            "its arrays have no names (np.savez(path, a, b, ...) calls them arr_0, arr_1, \
             ...): name them with keyword arguments, {}",
            save_hint(format)
        ));
    }
    REQUIRED
        .contains(&array)
        .then(|| format!("save the batch with {}", save_hint(format)))
}

impl Names {
    /// The convention's name in prose.
    fn label(self) -> &'static str {
        match self {
            Self::Crate => "cppo",
            Self::Verl => "verl",
            Self::Trl => "TRL",
        }
    }
}

/// The error for a missing array: what was looked for, what to do, and what the file
/// holds (each array's shape and dtype, from its header alone).
pub(crate) fn missing(
    src: &mut impl Source,
    lookup: Lookup,
    array: &'static str,
    needed_by: &str,
) -> Failure {
    let mut msg = format!("{}: array {array} is missing", src.path().display());
    let looked = lookup.names.candidates(array);
    if looked != [array] {
        msg.push_str(&format!(
            " (--names {} reads it from {})",
            lookup.names.flag(),
            or_list(looked)
        ));
    }
    msg.push_str(&format!("; it is required by {needed_by}"));
    let held = src.names();
    if let Some(hint) = missing_hint(&held, lookup, array, src.format()) {
        msg.push_str("; ");
        msg.push_str(&hint);
    }
    if held.is_empty() {
        msg.push_str("; the file holds no arrays");
    } else {
        let listed: Vec<String> = held
            .iter()
            .take(MAX_LISTED)
            .map(|n| match src.peek(n) {
                Some((shape, dtype)) => format!("{} {} {dtype}", shown(n), py_shape(&shape)),
                None => shown(n),
            })
            .collect();
        let count = match held.len() {
            1 => "1 array".to_string(),
            n => format!("{n} arrays"),
        };
        msg.push_str(&format!("; the file holds {count}: {}", listed.join(", ")));
        if held.len() > MAX_LISTED {
            msg.push_str(&format!(", and {} more", held.len() - MAX_LISTED));
        }
    }
    Failure::Input(msg)
}

/// The file's names of the arrays read, as `--names` found them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Resolved {
    pub(crate) names: Names,
    pub(crate) logp: &'static str,
    pub(crate) logp_old: &'static str,
    pub(crate) advantages: &'static str,
    pub(crate) mask: &'static str,
    pub(crate) topk: Option<(&'static str, &'static str)>,
    pub(crate) logp_ref: Option<&'static str>,
    pub(crate) is_weights: Option<&'static str>,
}

impl Resolved {
    /// ` (under --names verl: logp is the file's log_prob, ...)` for the arrays read
    /// under another name; empty under the crate's names.
    pub(crate) fn read_as(&self) -> String {
        let pairs = [
            ("logp", Some(self.logp)),
            ("logp_old", Some(self.logp_old)),
            ("advantages", Some(self.advantages)),
            ("mask", Some(self.mask)),
            ("topk_logp_old", self.topk.map(|t| t.0)),
            ("topk_logp", self.topk.map(|t| t.1)),
            ("logp_ref", self.logp_ref),
            ("is_weights", self.is_weights),
        ];
        let renamed: Vec<String> = pairs
            .iter()
            .filter_map(|&(a, n)| {
                n.filter(|n| *n != a)
                    .map(|n| format!("{a} is the file's {n}"))
            })
            .collect();
        if renamed.is_empty() {
            String::new()
        } else {
            format!(
                " (under --names {}: {})",
                self.names.flag(),
                renamed.join(", ")
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::Path;

    use super::*;

    fn held(names: &[&str]) -> Vec<String> {
        names.iter().map(ToString::to_string).collect()
    }

    const CRATE: Lookup = Lookup {
        names: Names::Crate,
    };

    /// docs/command_line.md's table of names is [`NAME_TABLE`], row for row.
    #[test]
    fn the_documented_names_are_the_table() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/command_line.md");
        let doc = fs::read_to_string(&path).unwrap();
        let header = "| array | `--names verl` | `--names trl` |";
        let at = doc.find(header).expect("the table of names");
        let rows: Vec<Vec<String>> = doc[at..]
            .lines()
            .skip(2)
            .take_while(|l| l.starts_with('|'))
            .map(|l| {
                l.trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect()
            })
            .collect();
        let cell = |names: &[&str]| {
            let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
            quoted.join(", ")
        };
        let want: Vec<Vec<String>> = NAME_TABLE
            .iter()
            .map(|r| {
                vec![
                    format!("`{}`", r.array),
                    cell(Names::Verl.candidates(r.array)),
                    cell(Names::Trl.candidates(r.array)),
                ]
            })
            .collect();
        assert_eq!(rows, want, "{}", path.display());
        // --names' help is made from the same table.
        let help = names_help();
        for r in &NAME_TABLE {
            assert!(help.contains(&Names::Verl.candidates(r.array).join(" | ")));
        }
    }

    #[test]
    fn lookups() {
        assert_eq!(Names::Crate.candidates("logp_old"), ["logp_old"]);
        assert_eq!(
            Names::Verl.candidates("logp_old"),
            ["old_log_probs", "old_log_prob", "rollout_log_probs"]
        );
        assert_eq!(Names::Trl.candidates("is_weights"), ["is_weights"]);
        assert_eq!(Names::Verl.candidates("topk_logp"), ["topk_logp"]);
        assert!(Names::Crate.candidates("nope").is_empty());
        for r in &NAME_TABLE {
            for n in Names::ALL {
                assert!(!n.candidates(r.array).is_empty(), "{n:?} {}", r.array);
            }
        }
    }

    #[test]
    fn hints() {
        let verl = held(&["old_log_probs", "log_prob", "advantages", "response_mask"]);
        let h = missing_hint(&verl, CRATE, "logp", Format::Npz).unwrap();
        assert!(h.starts_with("the file looks like a verl dump (old_log_probs, log_prob, response_mask): rerun with --names verl, or save it with np.savez(path, logp=..."), "{h}");
        let h = missing_hint(&verl, CRATE, "logp", Format::Safetensors).unwrap();
        assert!(
            h.contains("safetensors.torch.save_file({\"logp\": ..."),
            "{h}"
        );

        let trl = held(&[
            "per_token_logps",
            "old_per_token_logps",
            "completion_mask",
            "advantages",
        ]);
        let h = missing_hint(&trl, CRATE, "logp", Format::Npz).unwrap();
        assert!(h.starts_with("the file looks like a TRL dump (per_token_logps, old_per_token_logps, completion_mask): rerun with --names trl"), "{h}");

        let ours = held(&["logp", "logp_old", "advantages", "mask"]);
        let verl_lookup = Lookup { names: Names::Verl };
        let h = missing_hint(&ours, verl_lookup, "logp", Format::Npz).unwrap();
        assert_eq!(
            h,
            "the file uses cppo's own names (logp, logp_old, mask): rerun without --names"
        );

        // One array under verl's name among the crate's: no convention fits the file.
        let mixed = held(&["logp", "old_log_probs", "advantages", "mask"]);
        let h = missing_hint(&mixed, CRATE, "logp_old", Format::Npz).unwrap();
        assert_eq!(
            h,
            "old_log_probs is verl's name for logp_old: save it as logp_old"
        );

        let positional = held(&["arr_0", "arr_1", "arr_2", "arr_3"]);
        let h = missing_hint(&positional, CRATE, "logp", Format::Npz).unwrap();
        assert!(h.starts_with("its arrays have no names (np.savez(path, a, b, ...) calls them arr_0, arr_1, ...): name them with keyword arguments, np.savez(path, logp=..., logp_old=..., advantages=..., mask=...)"), "{h}");

        let h = missing_hint(&held(&["logp"]), CRATE, "logp_old", Format::Npz).unwrap();
        assert!(h.starts_with("save the batch with np.savez("), "{h}");
        // Not one of the four: no generic hint.
        assert_eq!(missing_hint(&ours, CRATE, "logp_ref", Format::Npz), None);
        // A verl file missing verl's reference log-probs: verl fits, but lacks it too.
        assert_eq!(
            missing_hint(&verl, verl_lookup, "logp_ref", Format::Npz),
            None
        );
    }

    #[test]
    fn message_pieces() {
        assert_eq!(py_shape(&[2, 6]), "(2, 6)");
        assert_eq!(py_shape(&[2]), "(2,)");
        assert_eq!(py_shape(&[]), "()");
        assert_eq!(or_list(&["a"]), "a");
        assert_eq!(or_list(&["a", "b", "c"]), "a, b or c");
        assert_eq!(shown(&"x".repeat(100)).len(), 64);
        assert!(positional("arr_12") && !positional("arr_") && !positional("arr_1x"));
    }
}
