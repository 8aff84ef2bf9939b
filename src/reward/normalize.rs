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

fn gcd(mut a: i128, mut b: i128) -> i128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Rational {
    /// `None` for a zero denominator or when a value does not fit in i128 (then the answer
    /// is compared as text).
    fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num, den).checked_abs()?.max(1);
        let sign = if den < 0 { -1 } else { 1 };
        Some(Self {
            num: num.checked_div(g)?.checked_mul(sign)?,
            den: den.checked_div(g)?.checked_mul(sign)?,
        })
    }

    /// "12", "-3.25", "007", "1/2" (a chain "a/b/c" is not a number).
    pub fn parse(s: &str) -> Option<Self> {
        if let Some((a, b)) = s.split_once('/') {
            let a = Rational::parse_decimal(a)?;
            let b = Rational::parse_decimal(b)?;
            return Rational::new(a.num.checked_mul(b.den)?, a.den.checked_mul(b.num)?);
        }
        Rational::parse_decimal(s)
    }

    fn parse_decimal(s: &str) -> Option<Self> {
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
        ("\\$", ""),
        ("{,}", ","),
        ("\\displaystyle", ""),
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

/// `\sqrt2` becomes `\sqrt{2}`, so both spellings share a key.
fn brace_sqrt(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    let mut rest = s;
    while let Some(i) = rest.find("\\sqrt") {
        out.push_str(&rest[..i + 5]);
        rest = &rest[i + 5..];
        match rest.chars().next() {
            Some(c) if c != '{' && c != '[' && !c.is_alphabetic() => {
                out.push('{');
                out.push(c);
                out.push('}');
                rest = &rest[c.len_utf8()..];
            }
            _ => {}
        }
    }
    out.push_str(rest);
    out
}

/// "x=5", "k=\frac12", "x\in[2,5)": the value after a single variable's `=` or `\in`.
fn without_assignment(s: &str) -> &str {
    for op in ["=", "\\in"] {
        if let Some((lhs, rhs)) = s.split_once(op) {
            let variable = !lhs.is_empty()
                && lhs.len() <= 8
                && lhs.starts_with(|c: char| c.is_alphabetic() || c == '\\')
                && lhs
                    .chars()
                    .all(|c| c.is_alphanumeric() || matches!(c, '\\' | '_' | '{' | '}'));
            if variable && !rhs.is_empty() && !rhs.contains(op) {
                return rhs;
            }
        }
    }
    s
}

/// Commas outside brackets split a tuple or interval's elements.
fn top_level_split(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut from) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[from..]);
    parts
}

/// The key two equivalent answers share.
pub fn canonical(answer: &str, format: AnswerFormat) -> String {
    if format == AnswerFormat::Choice {
        return answer
            .trim()
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_uppercase();
    }
    let stripped = brace_sqrt(&frac_to_slash(&strip(answer)));
    let value = without_assignment(&stripped);
    // A tuple or an interval: element by element, brackets kept ("[2, 5)" is not "(2, 5)").
    let bracketed = value.len() >= 2
        && value.starts_with(['(', '['])
        && value.ends_with([')', ']'])
        && value.is_char_boundary(value.len() - 1);
    if bracketed {
        let body = &value[1..value.len() - 1];
        let parts = top_level_split(body);
        if parts.len() > 1 {
            let inner: Vec<String> = parts.iter().map(|p| canonical_scalar(p)).collect();
            return format!(
                "{}{}{}",
                &value[..1],
                inner.join(","),
                &value[value.len() - 1..]
            );
        }
    }
    canonical_scalar(value)
}

/// One value: an exact reduced fraction when it is a number (units dropped), else its
/// lowercased text.
fn canonical_scalar(value: &str) -> String {
    let no_commas = if value.contains(',') && value.split(',').skip(1).all(|g| g.len() == 3) {
        value.replace(',', "")
    } else {
        value.to_string()
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
            ("x = 5", "5", Number),
            ("\\$18", "18", Boxed),
            ("\\sqrt2", "\\sqrt{2}", Boxed),
            ("\\frac{\\sqrt3}{2}", "\\dfrac{\\sqrt{3}}{2}", Boxed),
            ("2\\pi", "2 \\pi", Boxed),
            ("(1, \\frac{1}{2})", "(1,0.5)", Boxed),
            ("x \\in [2, 5)", "[2,5)", Boxed),
            ("1{,}000", "1000", Boxed),
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
            ("[2,5)", "(2,5)", Boxed),
            ("(1,2)", "(2,1)", Boxed),
            ("\\pi", "3.14", Boxed),
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

    /// Regression: a long chain of fractions in model output overflowed i128 and panicked.
    #[test]
    fn huge_or_chained_fractions_are_text_not_a_panic() {
        let chain = vec!["99999999999999999999"; 40].join("/");
        assert_eq!(Rational::parse(&chain), None);
        let big = format!("{}/{}", "9".repeat(30), "0.".to_string() + &"9".repeat(18));
        assert_eq!(Rational::parse(&big), None);
        assert_eq!(canonical(&chain, Number), chain);
    }
}
