use serde_json::Value;
use ttrl_serve::reward::{canonical, AnswerFormat};

/// MATH-500's gold answers and their common rewrites and near misses, graded by
/// `math-verify` (scripts/make_math_verify_fixture.py): ttrl-serve's equivalence must agree
/// with it on nearly all of them, and must almost never call a near miss equal (that would
/// reward a wrong answer).
#[test]
fn reward_matches_math_verify_on_math500_answers() {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/math-verify.jsonl"),
    )
    .unwrap();
    let (mut agree, mut false_equal, mut total) = (0usize, 0usize, 0usize);
    let mut misses = Vec::new();
    for line in text.lines() {
        let row: Value = serde_json::from_str(line).unwrap();
        let (gold, candidate) = (
            row["gold"].as_str().unwrap(),
            row["candidate"].as_str().unwrap(),
        );
        let want = row["equal"].as_bool().unwrap();
        let got = canonical(gold, AnswerFormat::Boxed) == canonical(candidate, AnswerFormat::Boxed);
        total += 1;
        if got == want {
            agree += 1;
        } else {
            false_equal += usize::from(got);
            misses.push(format!(
                "{gold:?} vs {candidate:?}: math-verify {want}, ours {got}"
            ));
        }
    }
    let rate = agree as f64 / total as f64;
    println!(
        "agreement with math-verify: {agree}/{total} = {rate:.4}; {false_equal} false 'equal'"
    );
    for m in misses.iter().take(40) {
        println!("  {m}");
    }
    assert!(total > 1500, "the fixture holds {total} pairs");
    assert!(rate >= 0.98, "agreement {rate:.4}");
    assert!(
        false_equal * 100 <= total,
        "{false_equal} false 'equal' of {total}"
    );
}
