//! Malformed JSONL never panics and always says where.

use herd_daemon::data::{parse, parse_noting, Dataset, DatasetKind};
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

/// Prompts may carry system prompts: one, or a list rejection sampling
/// varies; an empty one, a non-string, or one beside a system message in
/// the prompt itself is refused by line and field.
#[test]
fn prompts_take_system_prompts() {
    let text = "{\"prompt\": \"q\", \"system\": \"Be brief.\"}\n{\"prompt\": \"q\", \"system\": [\"A.\", \"B.\"]}\n";
    let Dataset::Prompts(x) = parse(DatasetKind::Prompts, text, "q").unwrap() else {
        panic!()
    };
    assert_eq!(x[0].system, ["Be brief."]);
    assert_eq!(x[1].messages(3)[0].content, "B.");
    assert_eq!(x[1].messages(3)[1].content, "q");
    let bad = "{\"prompt\": \"q\", \"system\": [\"\"]}\n{\"prompt\": \"q\", \"system\": [1]}\n{\"messages\": [{\"role\": \"system\", \"content\": \"s\"}, {\"role\": \"user\", \"content\": \"q\"}], \"system\": \"t\"}\n";
    let err = parse(DatasetKind::Prompts, bad, "q.jsonl").unwrap_err();
    let at: Vec<(usize, &str)> = err
        .errors
        .iter()
        .map(|e| (e.line, e.field.as_str()))
        .collect();
    assert_eq!(at, [(1, "system[0]"), (2, "system[0]"), (3, "system")]);
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

fn prefs(text: &str) -> Vec<herd_daemon::data::PreferenceExample> {
    match parse(DatasetKind::Preference, text, "p.jsonl") {
        Ok(Dataset::Preference(p)) => p,
        other => panic!("{other:?}"),
    }
}

/// Rows shaped as published: UltraFeedback-binarized (prompt string, chosen
/// and rejected as dialogs repeating it, ids and scores beside), HH-RLHF
/// (text dialogs, implicit prompt), TRL's conversational implicit prompt
/// with several turns, and a plain-text corpus for SFT.
#[test]
fn datasets_as_they_are_published() {
    let uf = r#"{"prompt": "What is 2+2?", "prompt_id": "abc123", "chosen": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], "rejected": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "5"}], "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}], "score_chosen": 9.0, "score_rejected": 2.0}"#;
    let (ds, notes) = parse_noting(DatasetKind::Preference, uf, "uf.jsonl").unwrap();
    let Dataset::Preference(p) = ds else { panic!() };
    assert_eq!(p[0].prompt.len(), 1);
    assert_eq!(p[0].prompt[0].content, "What is 2+2?");
    assert_eq!(p[0].responses, vec!["4", "5"]);
    assert_eq!(
        notes,
        vec!["ignored column(s) herd does not use: messages, prompt_id, score_chosen, score_rejected"]
    );

    let hh = r#"{"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road?", "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant: No."}"#;
    let p = prefs(hh);
    let roles: Vec<&str> = p[0].prompt.iter().map(|m| m.role.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user"]);
    assert_eq!(p[0].prompt[2].content, "Tell me a joke");
    assert_eq!(
        p[0].responses,
        vec!["Why did the chicken cross the road?", "No."]
    );

    let trl = r#"{"chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}], "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Lyon."}]}"#;
    let p = prefs(trl);
    assert_eq!(p[0].prompt.len(), 2);
    assert_eq!(p[0].responses, vec!["Paris.", "Lyon."]);

    // Responses that differ before their last turn cannot be ranked as one answer.
    let split = r#"{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}"#;
    let err = parse(DatasetKind::Preference, split, "split.jsonl").unwrap_err();
    assert_eq!(err.errors[0].field, "chosen[1]", "{err}");
    assert!(
        err.to_string().contains("one final assistant turn"),
        "{err}"
    );
    // A row with neither prompt nor dialogs still says what is missing.
    let err = parse(
        DatasetKind::Preference,
        r#"{"chosen": "a", "rejected": "b"}"#,
        "x",
    )
    .unwrap_err();
    assert_eq!(err.errors[0].field, "chosen");

    let corpus = "{\"text\": \"The quick brown fox.\", \"id\": 1}\n{\"text\": \"Jumps over the lazy dog.\"}\n";
    let (ds, notes) = parse_noting(DatasetKind::Sft, corpus, "c.jsonl").unwrap();
    let Dataset::Sft(rows) = ds else { panic!() };
    assert_eq!(rows[0].text.as_deref(), Some("The quick brown fox."));
    assert!(rows[0].messages.is_empty());
    assert_eq!(notes, vec!["ignored column(s) herd does not use: id"]);
    assert!(parse(DatasetKind::Sft, "{\"text\": \"  \"}", "e").is_err());
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
