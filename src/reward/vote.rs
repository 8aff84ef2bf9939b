//! The majority vote: leaves without an answer are left out and get reward 0; the most
//! common canonical answer is the pseudo-label (a tie goes to the one seen first); a leaf
//! is rewarded 1 when its answer is equivalent to the label.

#[derive(Debug, Clone, PartialEq)]
pub struct Vote {
    /// The winning canonical answer, if any leaf gave one.
    pub label: Option<String>,
    /// One reward per leaf, in input order.
    pub rewards: Vec<f32>,
    /// Votes for the label over all leaves (unparseable ones included).
    pub share: f32,
    /// (answer, votes), most votes first, ties in order of first appearance.
    pub counts: Vec<(String, usize)>,
}

pub fn majority_vote(answers: &[Option<String>]) -> Vote {
    let mut counts: Vec<(String, usize)> = Vec::new();
    for a in answers.iter().flatten() {
        match counts.iter_mut().find(|(k, _)| k == a) {
            Some((_, n)) => *n += 1,
            None => counts.push((a.clone(), 1)),
        }
    }
    // Stable sort: equal counts keep their order of first appearance.
    counts.sort_by_key(|c| std::cmp::Reverse(c.1));
    let label = counts.first().map(|(k, _)| k.clone());
    let rewards: Vec<f32> = answers
        .iter()
        .map(|a| f32::from(u8::from(a.is_some() && a == &label)))
        .collect();
    let share = if answers.is_empty() {
        0.0
    } else {
        counts
            .first()
            .map_or(0.0, |c| c.1 as f32 / answers.len() as f32)
    };
    Vote {
        label,
        rewards,
        share,
        counts,
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
    }

    #[test]
    fn no_answers_means_no_label_and_no_reward() {
        let v = majority_vote(&some(&["", ""]));
        assert_eq!(v.label, None);
        assert_eq!(v.rewards, vec![0.0, 0.0]);
        assert_eq!(v.share, 0.0);
    }
}
