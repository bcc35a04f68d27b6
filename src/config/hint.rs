//! "Did you mean …?" for config errors.
//!
//! serde reports an unknown name as ``unknown variant `token_mean`, expected one of
//! `token-mean`, …`` (and the same for fields). [`did_you_mean`] reads the name given and
//! the names allowed from that message and picks the closest: first a name that differs
//! only in case or in `-` against `_` (`token_mean` → `token-mean`, `Binary-TV` →
//! `binary_tv`), else the one at the smallest edit distance, if that distance is at most
//! a third of the name's length (`detla` → `delta`, `cpo` → `cppo`). Anything else gets
//! no hint: a wrong guess is worse than none.

/// The hint to append to a serde error message, if it names an unknown variant or field
/// and one of the allowed names is close: `` "; did you mean `token-mean`?" ``.
pub(crate) fn did_you_mean(message: &str) -> Option<String> {
    let rest = message
        .strip_prefix("unknown variant ")
        .or_else(|| message.strip_prefix("unknown field "))?;
    let mut quoted = rest.split('`').skip(1).step_by(2);
    let given = quoted.next()?;
    let allowed: Vec<&str> = quoted.collect();
    closest(given, &allowed).map(|name| format!("; did you mean `{name}`?"))
}

/// `message` with the hint appended, if there is one. A trailing ` at line N column M`
/// (serde_json's position) is dropped: the error is re-raised, and the format adds the
/// position again.
pub(crate) fn with_hint(message: &str) -> Option<String> {
    let body = strip_position(message);
    did_you_mean(body).map(|hint| format!("{body}{hint}"))
}

/// `message` without a trailing ` at line N column M`.
pub(crate) fn strip_position(message: &str) -> &str {
    let Some(i) = message.rfind(" at line ") else {
        return message;
    };
    let tail = &message[i + " at line ".len()..];
    let ok = tail.split_once(" column ").is_some_and(|(l, c)| {
        !l.is_empty() && !c.is_empty() && (l.chars().chain(c.chars())).all(|ch| ch.is_ascii_digit())
    });
    if ok { &message[..i] } else { message }
}

/// The allowed name closest to `given`, under the rules of the module docs.
fn closest<'a>(given: &str, allowed: &[&'a str]) -> Option<&'a str> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let g = norm(given);
    if let Some(&exact) = allowed.iter().find(|a| norm(a) == g) {
        return Some(exact);
    }
    let (best, dist) = allowed
        .iter()
        .map(|&a| (a, edit_distance(&g, &norm(a))))
        .min_by_key(|&(_, d)| d)?;
    (dist >= 1 && 3 * dist <= g.chars().count()).then_some(best)
}

/// The edit distance between two strings, by characters: insertions, deletions,
/// substitutions and swaps of two adjacent characters (`detla` → `delta` is one edit),
/// each costing 1 (the optimal-string-alignment distance).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let w = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * w];
    for i in 0..=a.len() {
        for j in 0..=b.len() {
            d[i * w + j] = if i == 0 || j == 0 {
                i + j
            } else {
                let sub = d[(i - 1) * w + j - 1] + usize::from(a[i - 1] != b[j - 1]);
                let mut best = sub.min(d[(i - 1) * w + j] + 1).min(d[i * w + j - 1] + 1);
                if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                    best = best.min(d[(i - 2) * w + j - 2] + 1);
                }
                best
            };
        }
    }
    d[a.len() * w + b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distances_worked_by_hand() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3); // k→s, e→i, +g
        assert_eq!(edit_distance("detla", "delta"), 1); // one swap
        assert_eq!(edit_distance("ab", "ba"), 1);
        assert_eq!(edit_distance("cpo", "cppo"), 1);
        assert_eq!(edit_distance("δ", "d"), 1); // by characters, not bytes
    }

    #[test]
    fn hints_from_serde_messages() {
        let agg = "unknown variant `token_mean`, expected one of `token-mean`, \
                   `seq-mean-token-mean`, `seq-mean-token-sum`, `seq-mean-token-sum-norm`";
        assert_eq!(did_you_mean(agg).unwrap(), "; did you mean `token-mean`?");
        let div = "unknown variant `Binary-TV`, expected one of `binary_tv`, `binary_kl`";
        assert_eq!(did_you_mean(div).unwrap(), "; did you mean `binary_tv`?");
        let field = "unknown field `detla`, expected one of `kind`, `delta`, `delta_b`";
        assert_eq!(did_you_mean(field).unwrap(), "; did you mean `delta`?");
        let kind = "unknown variant `cpo`, expected one of `none`, `ratio`, `dppo`, `cppo`";
        assert_eq!(did_you_mean(kind).unwrap(), "; did you mean `cppo`?");
        let preset_field = "unknown field `agregation`, expected one of `preset`, `aggregation`";
        assert_eq!(
            did_you_mean(preset_field).unwrap(),
            "; did you mean `aggregation`?"
        );
    }

    #[test]
    fn position_is_dropped_from_the_rebuilt_message() {
        let m = "unknown field `detla`, expected one of `delta` at line 1 column 31";
        assert_eq!(
            with_hint(m).unwrap(),
            "unknown field `detla`, expected one of `delta`; did you mean `delta`?"
        );
        assert_eq!(
            strip_position("x at line 1 column z"),
            "x at line 1 column z"
        );
        assert_eq!(strip_position("no position"), "no position");
    }

    #[test]
    fn no_hint_when_nothing_is_close_or_the_message_is_another() {
        let far = "unknown variant `entropy`, expected one of `binary_tv`, `binary_kl`";
        assert_eq!(did_you_mean(far), None);
        assert_eq!(
            did_you_mean("invalid type: string \"x\", expected f64"),
            None
        );
        assert_eq!(did_you_mean("unknown field `x`, there are no fields"), None);
    }
}
