//! Equivalence of answers: strings are mapped to a canonical key, and two answers are
//! equivalent when their keys are equal. Numbers become exact reduced fractions, so
//! "025" = "25", "0.5" = "1/2" = "\frac{1}{2}", and "1,000" = "1000".

use super::extract::AnswerFormat;

/// An exact rational number p/q with q > 0, reduced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rational {
    pub num: i128,
    pub den: i128,
}

fn gcd(a: i128, b: i128) -> i128 {
    if b == 0 {
        a.abs()
    } else {
        gcd(b, a % b)
    }
}

impl Rational {
    fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num, den).max(1);
        let sign = if den < 0 { -1 } else { 1 };
        Some(Self {
            num: sign * num / g,
            den: sign * den / g,
        })
    }

    /// "12", "-3.25", "007", "1/2".
    pub fn parse(s: &str) -> Option<Self> {
        if let Some((a, b)) = s.split_once('/') {
            let a = Rational::parse(a)?;
            let b = Rational::parse(b)?;
            return Rational::new(a.num * b.den, a.den * b.num);
        }
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.chars().chain(frac.chars()).all(|c| c.is_ascii_digit())
            || frac.len() > 18
            || int.len() > 30
        {
            return None;
        }
        let den = 10i128.checked_pow(frac.len() as u32)?;
        let whole: i128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let part: i128 = if frac.is_empty() {
            0
        } else {
            frac.parse().ok()?
        };
        let num = whole.checked_mul(den)?.checked_add(part)?;
        Rational::new(if neg { -num } else { num }, den)
    }
}

/// Strips LaTeX and formatting that does not change the value: `$`, `\text{...}` wrappers,
/// `\left`/`\right`, `\!`, spaces, thousands separators, trailing units and periods.
fn strip(s: &str) -> String {
    let mut t = s.trim().to_string();
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\%", ""),
        ("%", ""),
        ("$", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
    ] {
        t = t.replace(from, to);
    }
    // \text{...} and \mbox{...}: keep the content.
    for cmd in ["\\text{", "\\textbf{", "\\mbox{", "\\mathrm{"] {
        while let Some(i) = t.find(cmd) {
            let after = &t[i + cmd.len()..];
            match after.find('}') {
                Some(j) => t = format!("{}{}{}", &t[..i], &after[..j], &after[j + 1..]),
                None => break,
            }
        }
    }
    t.retain(|c| !c.is_whitespace());
    t.trim_end_matches('.').to_string()
}

/// `\frac{a}{b}` and `\frac ab` become `a/b`.
fn frac_to_slash(s: &str) -> String {
    let Some(i) = s.find("\\frac") else {
        return s.to_string();
    };
    let rest = &s[i + 5..];
    let take = |r: &str| -> Option<(String, usize)> {
        if let Some(body) = r.strip_prefix('{') {
            let mut depth = 1;
            for (j, c) in body.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some((body[..j].to_string(), j + 2));
                        }
                    }
                    _ => {}
                }
            }
            None
        } else {
            r.chars().next().map(|c| (c.to_string(), c.len_utf8()))
        }
    };
    match take(rest).and_then(|(a, n)| take(&rest[n..]).map(|(b, m)| (a, b, n + m))) {
        Some((a, b, used)) => frac_to_slash(&format!("{}{a}/{b}{}", &s[..i], &rest[used..])),
        None => s.to_string(),
    }
}

/// The key two equivalent answers share.
pub fn canonical(answer: &str, format: AnswerFormat) -> String {
    if format == AnswerFormat::Choice {
        return answer
            .trim()
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_uppercase();
    }
    let stripped = frac_to_slash(&strip(answer));
    let no_commas = if stripped.contains(',') && stripped.split(',').skip(1).all(|g| g.len() == 3) {
        stripped.replace(',', "")
    } else {
        stripped.clone()
    };
    // A number followed by a unit word ("72 clips" was stripped of spaces: "72clips").
    let numeric: String = no_commas
        .char_indices()
        .take_while(|&(i, c)| {
            c.is_ascii_digit() || c == '.' || c == '/' || (i == 0 && (c == '-' || c == '+'))
        })
        .map(|(_, c)| c)
        .collect();
    let unit_only = no_commas[numeric.len()..]
        .chars()
        .all(|c| c.is_alphabetic());
    match Rational::parse(&numeric).filter(|_| unit_only || numeric.len() == no_commas.len()) {
        Some(r) if r.den == 1 => format!("{}", r.num),
        Some(r) => format!("{}/{}", r.num, r.den),
        None => no_commas.to_lowercase(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AnswerFormat::*;

    #[test]
    fn equivalence_table() {
        let same: &[(&str, &str, AnswerFormat)] = &[
            ("025", "25", Number),
            ("0.5", "1/2", Number),
            ("\\frac{1}{2}", "0.5", Boxed),
            ("\\dfrac{3}{4}", ".75", Boxed),
            ("1,234", "1234", Number),
            ("$18", "18", Number),
            ("72 clips", "72", Number),
            ("10\\%", "10", Number),
            ("\\text{(B)}", "(B)", Boxed),
            ("-3.0", "-3", Number),
            ("90^\\circ", "90", Boxed),
            ("\\frac12", "1/2", Boxed),
            ("(b)", "B", Choice),
            (" Paris ", "paris", Text),
        ];
        for (a, b, f) in same {
            assert_eq!(canonical(a, *f), canonical(b, *f), "{a:?} vs {b:?}");
        }
        let different: &[(&str, &str, AnswerFormat)] = &[
            ("1/3", "0.33", Number),
            ("12", "21", Number),
            ("1,23", "123", Number),
            ("A", "B", Choice),
            ("\\sqrt{2}", "2", Boxed),
        ];
        for (a, b, f) in different {
            assert_ne!(canonical(a, *f), canonical(b, *f), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn rationals_parse_exactly() {
        assert_eq!(Rational::parse("0.25"), Some(Rational { num: 1, den: 4 }));
        assert_eq!(Rational::parse("-6/4"), Some(Rational { num: -3, den: 2 }));
        assert_eq!(Rational::parse("1/0"), None);
        assert_eq!(Rational::parse("abc"), None);
    }
}
