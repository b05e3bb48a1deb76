//! Malformed JSONL never panics and always says where.

use herd_daemon::data::{parse, Dataset, DatasetKind};
use proptest::prelude::*;

#[test]
fn formats_users_bring_parse() {
    let pref = r#"{"prompt": "Hi", "responses": ["a", "b", "c"], "strength": "better"}
{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y", "edited": "z"}
"#;
    let Dataset::Preference(p) = parse(DatasetKind::Preference, pref, "p.jsonl").unwrap() else {
        panic!()
    };
    assert_eq!(p[1].responses, vec!["z", "x", "y"]);
    let sft = "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": \"a\"}]}\n{\"prompt\": \"q\", \"completion\": \"a\"}\n";
    assert_eq!(parse(DatasetKind::Sft, sft, "s").unwrap().len(), 2);
    let prompts = "{\"prompt\": \"q\", \"answer\": 42}\n{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n";
    let Dataset::Prompts(x) = parse(DatasetKind::Prompts, prompts, "q").unwrap() else {
        panic!()
    };
    assert_eq!(x[0].answer.as_deref(), Some("42"));
}

#[test]
fn errors_name_file_line_and_field() {
    let text = "{\"prompt\": \"ok\", \"responses\": [\"a\", \"b\"]}\n{\"prompt\": \"x\", \"responses\": [\"a\"]}\nnot json\n{\"prompt\": \"x\", \"responses\": [\"a\", \"b\"], \"strength\": \"meh\"}\n{\"prompt\": [{\"role\": \"robot\", \"content\": \"x\"}], \"chosen\": \"a\", \"rejected\": \"b\"}\n";
    let err = parse(DatasetKind::Preference, text, "prefs.jsonl").unwrap_err();
    let lines: Vec<(usize, &str)> = err
        .errors
        .iter()
        .map(|e| (e.line, e.field.as_str()))
        .collect();
    assert_eq!(
        lines,
        vec![
            (2, "responses"),
            (3, "(line)"),
            (4, "strength"),
            (5, "prompt[0].role")
        ]
    );
    let msg = err.to_string();
    assert!(
        msg.starts_with("prefs.jsonl") && msg.contains("line 4") && msg.contains("not imported"),
        "{msg}"
    );
    let err = parse(
        DatasetKind::Sft,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"q\"}]}\n",
        "s.jsonl",
    )
    .unwrap_err();
    assert!(err.to_string().contains("assistant"));
    assert!(parse(DatasetKind::Prompts, "\n\n", "empty.jsonl").is_err());
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic(text in ".{0,400}") {
        for kind in [DatasetKind::Preference, DatasetKind::Sft, DatasetKind::Prompts] {
            if let Err(e) = parse(kind, &text, "fuzz.jsonl") {
                prop_assert!(!e.errors.is_empty());
                prop_assert!(e.errors.iter().all(|x| x.line <= text.lines().count()));
            }
        }
    }

    #[test]
    fn mutated_valid_lines_are_located(cut in 0usize..60, junk in "[\\[\\]{}\",:a-z0-9 ]{0,8}") {
        let good = r#"{"prompt": [{"role": "user", "content": "Hi"}], "chosen": "x", "rejected": "y", "strength": "better"}"#;
        let cut = cut.min(good.len());
        let bad = format!("{}{}{}", &good[..cut], junk, &good[cut..]);
        let text = format!("{good}\n{bad}\n{good}\n");
        if let Err(e) = parse(DatasetKind::Preference, &text, "f.jsonl") {
            prop_assert!(e.errors.iter().all(|x| x.line == 2), "{e}");
        }
    }
}
