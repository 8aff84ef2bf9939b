//! Answers and votes: extraction, normalisation, equivalence and the majority vote that
//! turns a group of sampled responses into a pseudo-label and 0/1 rewards (TTRL, Zuo et al.
//! 2025, arXiv 2504.16084). Pure functions; no model, no I/O.

mod extract;
mod normalize;
mod options;
mod vote;

pub use extract::{answer_start, detect_format, extract_answer, option_count, AnswerFormat};
pub use normalize::{canonical, Rational};
pub use options::{reverse_options, unreverse};
pub use vote::{majority_vote, weighted_vote, Vote};
