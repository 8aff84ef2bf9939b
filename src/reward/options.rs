//! Multiple-choice options in reverse order. A small model picks a letter for its place in
//! the list as much as for what it says (Zheng et al. 2023, arXiv 2309.03882). When half of
//! a question's leaves see the options reversed and every vote is read back to the option it
//! names, a letter chosen for its place splits across two options and only a preference for
//! the content adds up to a majority.

use super::extract::{choices, OPTION_LETTERS as LETTERS};

/// How an option line opens: "A. ", "A) ", "(A) " or "A: ".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    Dot,
    Paren,
    Wrapped,
    Colon,
}

impl Marker {
    const ALL: [Marker; 4] = [Marker::Dot, Marker::Paren, Marker::Wrapped, Marker::Colon];

    fn prefix(self, letter: char) -> String {
        match self {
            Marker::Dot => format!("{letter}. "),
            Marker::Paren => format!("{letter}) "),
            Marker::Wrapped => format!("({letter}) "),
            Marker::Colon => format!("{letter}: "),
        }
    }
}

/// One option line: its marker, its content, and the line ending after it.
struct OptionLine<'a> {
    marker: Marker,
    content: &'a str,
    ending: &'a str,
}

fn option_line(line: &str, letter: char) -> Option<OptionLine<'_>> {
    let body = line.trim_end_matches(['\n', '\r']);
    let ending = &line[body.len()..];
    Marker::ALL.into_iter().find_map(|marker| {
        let content = body.strip_prefix(marker.prefix(letter).as_str())?;
        Some(OptionLine {
            marker,
            content,
            ending,
        })
    })
}

/// `text` with the contents of its last run of option lines (A first, one per line, the same
/// marker, at least three) in reverse order under the same letters, and how many options the
/// run holds. `None` without such a run, or when an option names another by its letter
/// ("Both A and B"), which reordering would make false.
pub fn reverse_options(text: &str) -> Option<(String, usize)> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut last: Option<(usize, Vec<OptionLine<'_>>)> = None;
    let mut i = 0;
    while i < lines.len() {
        let Some(first) = option_line(lines[i], 'A') else {
            i += 1;
            continue;
        };
        let marker = first.marker;
        let mut run = vec![first];
        while run.len() < LETTERS.len() {
            let Some(next) = lines
                .get(i + run.len())
                .and_then(|l| option_line(l, LETTERS[run.len()]))
                .filter(|o| o.marker == marker)
            else {
                break;
            };
            run.push(next);
        }
        let len = run.len();
        if len >= 3 {
            last = Some((i, run));
        }
        i += len;
    }
    let (start, run) = last?;
    let k = run.len();
    // An option that names another ("Both A and B"), read as answers are read.
    let named = |o: &OptionLine<'_>| {
        choices(o.content)
            .iter()
            .any(|c| c.starts_with(&LETTERS[..k]))
    };
    if run.iter().any(named) {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    lines[..start].iter().for_each(|l| out.push_str(l));
    for (j, line) in run.iter().enumerate() {
        out.push_str(&line.marker.prefix(LETTERS[j]));
        out.push_str(run[k - 1 - j].content);
        out.push_str(line.ending);
    }
    lines[start + k..].iter().for_each(|l| out.push_str(l));
    Some((out, k))
}

/// The option a letter read from the reversed prompt names in the original one; an answer
/// that is not one of the `options` letters is left as it is.
pub fn unreverse(answer: &str, options: usize) -> String {
    let k = options.min(LETTERS.len());
    let mut chars = answer.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => match LETTERS[..k].iter().position(|&l| l == c) {
            Some(i) => LETTERS[k - 1 - i].to_string(),
            None => answer.to_string(),
        },
        _ => answer.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARC: &str = "Which event helps to renew a resource?\nA. A seed is planted from a tree.\nB. An offshore rig pumps oil.\nC. A car is filled with gasoline.\nD. An office is heated with coal.\nAnswer with the letter of the correct option.";

    #[test]
    fn the_last_run_of_options_is_reversed_under_the_same_letters() {
        let (reversed, k) = reverse_options(ARC).unwrap();
        assert_eq!(k, 4);
        assert_eq!(
            reversed,
            "Which event helps to renew a resource?\nA. An office is heated with coal.\nB. A car is filled with gasoline.\nC. An offshore rig pumps oil.\nD. A seed is planted from a tree.\nAnswer with the letter of the correct option."
        );
        assert_eq!(reverse_options(&reversed).unwrap().0, ARC);
        // Inside a chat template, wrapped markers, Windows line endings, three options.
        let chat =
            "<|im_start|>user\nPick one:\r\n(A) red\r\n(B) green\r\n(C) blue\r\n<|im_end|>\n";
        assert_eq!(
            reverse_options(chat).unwrap(),
            (
                "<|im_start|>user\nPick one:\r\n(A) blue\r\n(B) green\r\n(C) red\r\n<|im_end|>\n"
                    .to_string(),
                3
            )
        );
        // Two runs: an example in the system prompt, then the question's own.
        let two = "A. x\nB. y\nC. z\n\nQ?\nA) 1\nB) 2\nC) 3\nD) 4\n";
        assert_eq!(
            reverse_options(two).unwrap().0,
            "A. x\nB. y\nC. z\n\nQ?\nA) 4\nB) 3\nC) 2\nD) 1\n"
        );
    }

    #[test]
    fn options_that_are_not_a_reorderable_list_are_left_alone() {
        // Two options, letters out of order, mixed markers, inline options.
        assert_eq!(reverse_options("Q?\nA. yes\nB. no\n"), None);
        assert_eq!(reverse_options("Q?\nA. x\nC. y\nB. z\n"), None);
        assert_eq!(reverse_options("Q?\nA. x\nB) y\nC. z\n"), None);
        assert_eq!(reverse_options("Q? (A) x (B) y (C) z"), None);
        // An option that names another would be false once moved.
        assert_eq!(
            reverse_options("Q?\nA. ice\nB. steam\nC. Both A and B\nD. neither\n"),
            None
        );
    }

    #[test]
    fn a_reversed_letter_is_read_back_to_the_option_it_names() {
        assert_eq!(unreverse("A", 4), "D");
        assert_eq!(unreverse("B", 4), "C");
        assert_eq!(unreverse("C", 3), "A");
        assert_eq!(unreverse("E", 4), "E");
        assert_eq!(unreverse("42", 4), "42");
    }
}
