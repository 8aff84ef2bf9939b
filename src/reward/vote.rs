//! The majority vote: leaves without an answer are left out and get reward 0; the answer
//! with the most weight is the pseudo-label (a tie goes to the one seen first); a leaf is
//! rewarded 1 when its answer is equivalent to the label. TTRL weighs every leaf 1;
//! [`weighted_vote`] lets surer leaves weigh more (DeepConf's confidence-weighted voting,
//! arXiv 2508.15260).

#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// The winning canonical answer, if any leaf gave one.
    pub label: Option<String>,
    /// One reward per leaf, in input order.
    pub rewards: Vec<f32>,
    /// Votes for the label over all leaves (unparseable ones included).
    pub share: f32,
    /// (answer, votes), the label first, then by weight; equal weights in order of first
    /// appearance.
    pub counts: Vec<(String, usize)>,
    /// The runner-up weighs as much as the label: the tie went to the answer seen first.
    pub tied: bool,
}

/// Every leaf weighs the same: the answer with the most votes wins.
pub fn majority_vote(answers: &[Option<String>]) -> Vote {
    weighted_vote(answers, &vec![1.0; answers.len()])
}

/// The answer whose leaves weigh most wins; `weights` has one entry per answer.
pub fn weighted_vote(answers: &[Option<String>], weights: &[f32]) -> Vote {
    debug_assert_eq!(answers.len(), weights.len());
    let mut tally: Vec<(String, usize, f64)> = Vec::new();
    for (a, &w) in answers
        .iter()
        .zip(weights)
        .filter_map(|(a, w)| Some((a.as_ref()?, w)))
    {
        match tally.iter_mut().find(|(k, _, _)| k == a) {
            Some((_, n, total)) => {
                *n += 1;
                *total += f64::from(w);
            }
            None => tally.push((a.clone(), 1, f64::from(w))),
        }
    }
    // Stable sort: equal weights keep their order of first appearance.
    tally.sort_by(|a, b| b.2.total_cmp(&a.2));
    let tied = matches!(tally.as_slice(), [first, second, ..] if first.2 == second.2);
    let label = tally.first().map(|(k, _, _)| k.clone());
    let rewards: Vec<f32> = answers
        .iter()
        .map(|a| f32::from(u8::from(a.is_some() && a == &label)))
        .collect();
    let share = if answers.is_empty() {
        0.0
    } else {
        tally
            .first()
            .map_or(0.0, |c| c.1 as f32 / answers.len() as f32)
    };
    Vote {
        label,
        rewards,
        share,
        counts: tally.into_iter().map(|(k, n, _)| (k, n)).collect(),
        tied,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some(v: &[&str]) -> Vec<Option<String>> {
        v.iter()
            .map(|s| {
                if s.is_empty() {
                    None
                } else {
                    Some(s.to_string())
                }
            })
            .collect()
    }

    #[test]
    fn the_most_common_answer_wins_and_unparseable_leaves_get_zero() {
        let v = majority_vote(&some(&["12", "7", "12", "", "12", "7"]));
        assert_eq!(v.label.as_deref(), Some("12"));
        assert_eq!(v.rewards, vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        assert!((v.share - 0.5).abs() < 1e-6);
        assert_eq!(v.counts, vec![("12".into(), 3), ("7".into(), 2)]);
    }

    #[test]
    fn a_tie_goes_to_the_answer_seen_first() {
        let v = majority_vote(&some(&["", "9", "4", "4", "9"]));
        assert_eq!(v.label.as_deref(), Some("9"));
        assert_eq!(v.rewards, vec![0.0, 1.0, 0.0, 0.0, 1.0]);
        assert!(v.tied);
    }

    #[test]
    fn surer_leaves_outweigh_a_larger_unsure_group() {
        let answers = some(&["7", "12", "7", "12", "7", ""]);
        let v = weighted_vote(&answers, &[0.2, 0.9, 0.2, 0.9, 0.2, 1.0]);
        assert_eq!(v.label.as_deref(), Some("12"));
        assert_eq!(v.rewards, vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
        // The share and the counts stay in leaves, the label first.
        assert!((v.share - 2.0 / 6.0).abs() < 1e-6);
        assert_eq!(v.counts, vec![("12".into(), 2), ("7".into(), 3)]);
        assert!(!v.tied);
    }

    #[test]
    fn weights_break_a_tie_in_votes() {
        let answers = some(&["9", "4", "4", "9"]);
        assert!(majority_vote(&answers).tied);
        let v = weighted_vote(&answers, &[0.5, 0.6, 0.6, 0.5]);
        assert_eq!(v.label.as_deref(), Some("4"));
        assert!(!v.tied);
    }

    #[test]
    fn no_answers_means_no_label_and_no_reward() {
        let v = majority_vote(&some(&["", ""]));
        assert_eq!(v.label, None);
        assert_eq!(v.rewards, vec![0.0, 0.0]);
        assert_eq!(v.share, 0.0);
    }
}
