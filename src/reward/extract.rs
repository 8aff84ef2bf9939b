//! Pulling a final answer out of a response, Qwen2.5-Math style: the last `\boxed{...}`
//! (balanced braces), then "final answer is" / "the answer is", then the last number;
//! for multiple choice the last standalone option letter.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AnswerFormat {
    /// Chosen from the question: options A-D mean `choice`, anything else `number`
    /// with `\boxed{}` and "the answer is" honoured first.
    #[default]
    Auto,
    Boxed,
    Number,
    Choice,
    Text,
}

/// The format `auto` resolves to for this question.
pub fn detect_format(question: &str) -> AnswerFormat {
    if option_count(question) >= 3 {
        AnswerFormat::Choice
    } else if question.contains("\\boxed") {
        AnswerFormat::Boxed
    } else {
        AnswerFormat::Number
    }
}

/// The letters a multiple-choice option may carry.
pub(super) const OPTION_LETTERS: [char; 5] = ['A', 'B', 'C', 'D', 'E'];

/// How many of the option letters A-E the question lists ("(B)", "\nB.", "\nB)", "\nB:",
/// " B) "): the choices a multiple-choice answer is drawn from.
pub fn option_count(question: &str) -> usize {
    OPTION_LETTERS
        .iter()
        .filter(|l| {
            [
                format!("({l})"),
                format!("\n{l}."),
                format!("\n{l})"),
                format!("\n{l}:"),
                format!(" {l}) "),
            ]
            .iter()
            .any(|p| question.contains(p.as_str()))
        })
        .count()
}

/// The content of the last `\boxed{...}`, braces balanced.
fn last_boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed")?;
    let rest = &text[start + "\\boxed".len()..];
    let rest = rest.trim_start();
    let body = rest.strip_prefix('{')?;
    let mut depth = 1;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(body[..i].trim().to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// Text after the last "final answer is" / "the answer is" / "answer:", to the end of its sentence.
fn after_phrase(text: &str) -> Option<String> {
    let lower = text.to_lowercase();
    let (pos, len) = ["final answer is", "the answer is", "answer is", "answer:"]
        .iter()
        .filter_map(|p| lower.rfind(p).map(|i| (i, p.len())))
        .max_by_key(|(i, _)| *i)?;
    let tail = text.get(pos + len..)?.trim_start_matches([':', ' ', '\n']);
    let end = tail
        .char_indices()
        .find(|&(i, c)| {
            c == '\n' || (c == '.' && !tail[i + 1..].starts_with(|d: char| d.is_ascii_digit()))
        })
        .map_or(tail.len(), |(i, _)| i);
    let answer = tail[..end].trim();
    (!answer.is_empty()).then(|| answer.to_string())
}

/// The last number in the text: digits with optional sign, thousands separators,
/// decimals and a `/` fraction.
fn last_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut best: Option<String> = None;
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let mut j = i;
            while j < chars.len()
                && (chars[j].is_ascii_digit()
                    || ((chars[j] == ',' || chars[j] == '.' || chars[j] == '/')
                        && chars.get(j + 1).is_some_and(|c| c.is_ascii_digit())))
            {
                j += 1;
            }
            let negative =
                i > 0 && chars[i - 1] == '-' && (i < 2 || !chars[i - 2].is_alphanumeric());
            let mut s: String = chars[i..j].iter().collect();
            if negative {
                s.insert(0, '-');
            }
            best = Some(s);
            i = j;
        } else {
            i += 1;
        }
    }
    best
}

/// Standalone option letters A-E ("(B)", "B)", "answer is C", "**D**"), in order.
pub(super) fn choices(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut found = Vec::new();
    for (i, &c) in chars.iter().enumerate() {
        if !OPTION_LETTERS.contains(&c) {
            continue;
        }
        let before = i.checked_sub(1).map(|j| chars[j]);
        let after = chars.get(i + 1).copied();
        let standalone = |x: Option<char>| x.is_none_or(|x| !x.is_alphanumeric());
        if standalone(before) && standalone(after) {
            // "A" as an English article ("A cat") is not an option.
            let article = c == 'A'
                && after == Some(' ')
                && chars.get(i + 2).is_some_and(|x| x.is_lowercase());
            if !article {
                found.push(c.to_string());
            }
        }
    }
    found
}

fn last_choice(text: &str) -> Option<String> {
    choices(text).pop()
}

/// The answer a response gives in `format`, or `None` when it gives none.
pub fn extract_answer(text: &str, format: AnswerFormat) -> Option<String> {
    match format {
        // "The answer is B, not D" answers B: the first letter after the phrase.
        AnswerFormat::Choice => after_phrase(text)
            .and_then(|t| choices(&t).into_iter().next())
            .or_else(|| last_boxed(text).and_then(|t| last_choice(&t)))
            .or_else(|| last_choice(text)),
        AnswerFormat::Boxed => last_boxed(text),
        AnswerFormat::Text => last_boxed(text).or_else(|| after_phrase(text)).or_else(|| {
            let t = text.trim();
            (!t.is_empty()).then(|| t.lines().last().unwrap_or(t).trim().to_string())
        }),
        AnswerFormat::Number | AnswerFormat::Auto => last_boxed(text)
            .or_else(|| after_phrase(text).and_then(|t| last_number(&t)))
            .or_else(|| last_number(text)),
    }
}

/// Byte offset where the final answer span begins: the last `\\boxed`, an answer phrase
/// ("the answer is"), or the answer itself, whichever comes first. `None` without an answer.
/// Rollouts never fork at or after it (TreeRL's EPTree masks the answer the same way).
pub fn answer_start(text: &str, format: AnswerFormat) -> Option<usize> {
    let answer = extract_answer(text, format)?;
    let at = text.rfind(answer.as_str()).unwrap_or(0);
    let lower = text.to_ascii_lowercase();
    let cue = ["\\boxed", "answer is", "answer:"]
        .iter()
        .filter_map(|p| lower[..at].rfind(p))
        .max();
    Some(cue.map_or(at, |c| c.min(at)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use AnswerFormat::*;

    #[test]
    fn extraction_table() {
        let cases: &[(&str, AnswerFormat, Option<&str>)] = &[
            // GSM8K-style chain of thought with "####" and "The answer is".
            ("She has 3 + 4 = 7 apples.\n#### 7", Number, Some("7")),
            (
                "Natalia sold 48/2 = 24 clips in May. 48+24 = 72. The answer is 72.",
                Number,
                Some("72"),
            ),
            (
                "Total: $1,234.50 so the final answer is $1,234.50.",
                Number,
                Some("1,234.50"),
            ),
            ("It drops to -5 degrees.", Number, Some("-5")),
            ("x = 3, y = 4", Number, Some("4")),
            ("no digits here", Number, None),
            // MATH-500: the last \boxed{}, nested braces kept.
            (
                "So $x = \\boxed{\\frac{1}{2}}$.",
                Boxed,
                Some("\\frac{1}{2}"),
            ),
            (
                "First \\boxed{3}, then \\boxed{\\sqrt{2}+1}",
                Boxed,
                Some("\\sqrt{2}+1"),
            ),
            ("\\boxed{unclosed", Boxed, None),
            ("Therefore \\boxed{10}", Auto, Some("10")),
            // ARC: option letters.
            ("The answer is (B).", Choice, Some("B")),
            ("A plant needs light. So C is correct.", Choice, Some("C")),
            (
                "I think the answer is D because A cat cannot",
                Choice,
                Some("D"),
            ),
            ("Answer: A", Choice, Some("A")),
            ("\\boxed{B}", Choice, Some("B")),
            // Short text.
            ("The answer is Paris.", Text, Some("Paris")),
        ];
        for (text, format, want) in cases {
            assert_eq!(
                extract_answer(text, *format).as_deref(),
                *want,
                "{text:?} as {format:?}"
            );
        }
    }

    #[test]
    fn auto_format_detects_multiple_choice_and_boxed_instructions() {
        let arc = "Which is a mammal?\nA. shark\nB. whale\nC. trout\nD. eel";
        assert_eq!(detect_format(arc), Choice);
        assert_eq!(option_count(arc), 4);
        assert_eq!(option_count(&format!("{arc}\nE. ray")), 5);
        assert_eq!(detect_format("Put the final answer in \\boxed{}."), Boxed);
        assert_eq!(detect_format("What is 7 plus 5?"), Number);
    }

    /// Regression: "the answer is" followed by words, not a number, is no answer by itself
    /// (seen on SmolLM2: "I think an answer is ..." voted as `ananswer`).
    #[test]
    fn a_phrase_without_a_number_falls_back_to_the_last_number() {
        assert_eq!(
            extract_answer("7 + 5 = 12, so an answer is hard to doubt", Number).as_deref(),
            Some("12")
        );
        assert_eq!(extract_answer("The answer is unclear", Number), None);
    }

    #[test]
    fn the_first_letter_after_the_answer_phrase_is_the_choice() {
        assert_eq!(
            extract_answer("The answer is B, not D.", Choice).as_deref(),
            Some("B")
        );
    }

    #[test]
    fn the_answer_span_starts_at_its_cue_or_at_the_answer() {
        let text = "7 plus 4 makes 11, so the answer is 11.";
        assert_eq!(answer_start(text, Number), text.find("answer is"));
        assert_eq!(answer_start("It is 11.", Number), Some(6));
        assert_eq!(answer_start("So \\boxed{3}", Boxed), Some(3));
        assert_eq!(answer_start("no answer here", Number), None);
    }

    /// Regression: a decimal point inside the answer sentence does not end it.
    #[test]
    fn a_decimal_point_does_not_end_the_answer_sentence() {
        assert_eq!(
            extract_answer("The answer is 2.5 hours.", Number).as_deref(),
            Some("2.5")
        );
    }
}
