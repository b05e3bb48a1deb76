//! Datasets as users bring them (JSONL), parsed strictly.
//!
//! Three kinds: preference, sft, prompts. Each line is checked on its own and
//! every problem is reported with file, line and field; a file with any bad
//! line is refused whole, so nothing is ever half-imported.
//!
//! * preference: `{"prompt": [messages] | "text", "responses": [best, ..., worst],
//!   "strength": "significantly_better|better|slightly_better|marginally_better"}`,
//!   or TRL's `{"prompt", "chosen", "rejected"}` (strings or message lists;
//!   lists that repeat the prompt, as UltraFeedback-binarized does, are cut
//!   after it) with an optional `"edited"` (ranked above chosen), or TRL's
//!   implicit prompt: `{"chosen": [...], "rejected": [...]}` whose shared
//!   leading messages are the prompt (HH-RLHF's `"\n\nHuman: ...
//!   \n\nAssistant: ..."` text is read as such a dialog). What differs must
//!   be one final assistant turn.
//! * sft: `{"messages": [...]}` (ending with the assistant's turn),
//!   `{"prompt", "completion"}`, or `{"text": ...}` (plain language
//!   modelling: no chat format, every token trained).
//! * prompts: `{"prompt": ...}` or `{"messages": [...]}`, optional `"answer"`
//!   and `"system"`: a system prompt, or a list of them that rejection
//!   sampling varies across a prompt's samples (Llama 3 §4.2.2).
//!
//! Columns herd does not use (ids, scores, a copy of the dialog) are ignored
//! and named in the import's summary (`notes`); a missing required field is
//! still an error, so a misspelt one cannot pass unnoticed.

use herd_engine::chat::Message;

mod lines;

use lines::{preference_line, prompts_line, sft_line, unused};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// At most this many errors are listed for one file.
const MAX_ERRORS: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    Preference,
    Sft,
    Prompts,
}

impl DatasetKind {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "preference" => Ok(DatasetKind::Preference),
            "sft" => Ok(DatasetKind::Sft),
            "prompts" => Ok(DatasetKind::Prompts),
            other => Err(format!(
                "unknown dataset kind {other:?} (expected preference, sft or prompts)"
            )),
        }
    }
    pub fn as_str(self) -> &'static str {
        self.artifact().as_str()
    }
    /// The artifact kind a dataset of this kind is recorded as.
    pub fn artifact(self) -> herd_core::ArtifactKind {
        match self {
            DatasetKind::Preference => herd_core::ArtifactKind::Preference,
            DatasetKind::Sft => herd_core::ArtifactKind::Sft,
            DatasetKind::Prompts => herd_core::ArtifactKind::Prompts,
        }
    }
}

/// Annotators' preference strength (Llama 2/3's four levels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strength {
    SignificantlyBetter,
    Better,
    SlightlyBetter,
    MarginallyBetter,
}

impl Strength {
    pub const ALL: [Strength; 4] = [
        Strength::SignificantlyBetter,
        Strength::Better,
        Strength::SlightlyBetter,
        Strength::MarginallyBetter,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Strength::SignificantlyBetter => "significantly_better",
            Strength::Better => "better",
            Strength::SlightlyBetter => "slightly_better",
            Strength::MarginallyBetter => "marginally_better",
        }
    }
    /// Whether a pair marked `self` is at least as clear as `min` (the
    /// levels are declared strongest first).
    pub fn at_least(self, min: Strength) -> bool {
        self <= min
    }
    /// Llama 2's discrete margins for the optional margin term.
    pub fn margin(self) -> f32 {
        match self {
            Strength::SignificantlyBetter => 1.0,
            Strength::Better => 2.0 / 3.0,
            Strength::SlightlyBetter => 1.0 / 3.0,
            Strength::MarginallyBetter => 0.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreferenceExample {
    pub prompt: Vec<Message>,
    /// Best first: [edited,] chosen, rejected.
    pub responses: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<Strength>,
}

impl PreferenceExample {
    /// Marked weaker than `min` (a row without a strength is not).
    pub fn weaker_than(&self, min: Strength) -> bool {
        self.strength.is_some_and(|s| !s.at_least(min))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SftExample {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<Message>,
    /// Plain text to model as it is (no chat format, no prompt mask).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

impl SftExample {
    pub fn dialog(messages: Vec<Message>) -> Self {
        SftExample {
            messages,
            text: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptExample {
    pub prompt: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// System prompts to put before the prompt: sample `i` of a prompt gets
    /// `system[i % len]`; jobs that generate once use the first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub system: Vec<String>,
}

impl PromptExample {
    /// The dialog for sample `i`: the prompt after its `i`-th system prompt
    /// (cycling), or the prompt alone when it has none.
    pub fn messages(&self, i: usize) -> Vec<Message> {
        if self.system.is_empty() {
            return self.prompt.clone();
        }
        let mut m = vec![Message::new("system", &self.system[i % self.system.len()])];
        m.extend(self.prompt.iter().cloned());
        m
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Dataset {
    Preference(Vec<PreferenceExample>),
    Sft(Vec<SftExample>),
    Prompts(Vec<PromptExample>),
}

/// One problem on one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    pub line: usize,
    pub field: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {} bad line(s); the file was not imported:\n{}", errors.len(), errors.iter().map(|e| format!("  line {}: field `{}`: {}", e.line, e.field, e.reason)).collect::<Vec<_>>().join("\n"))]
pub struct DataError {
    pub file: String,
    pub errors: Vec<LineError>,
}

/// Parse a whole JSONL text. Blank lines are skipped.
pub fn parse(kind: DatasetKind, text: &str, file: &str) -> Result<Dataset, DataError> {
    parse_noting(kind, text, file).map(|(d, _)| d)
}

/// The columns each kind reads; others are ignored (and noted).
fn used_columns(kind: DatasetKind) -> &'static [&'static str] {
    match kind {
        DatasetKind::Preference => &[
            "prompt",
            "responses",
            "chosen",
            "rejected",
            "edited",
            "strength",
        ],
        DatasetKind::Sft => &["messages", "prompt", "completion", "text"],
        DatasetKind::Prompts => &["prompt", "messages", "answer", "system"],
    }
}

/// Parse, and say what was ignored (`notes` for the import's summary).
pub fn parse_noting(
    kind: DatasetKind,
    text: &str,
    file: &str,
) -> Result<(Dataset, Vec<String>), DataError> {
    let mut ignored = std::collections::BTreeSet::new();
    let mut errors = vec![];
    let (mut pref, mut sft, mut prompts) = (vec![], vec![], vec![]);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let lineno = i + 1;
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                errors.push(LineError {
                    line: lineno,
                    field: "(line)".into(),
                    reason: format!("not valid JSON: {e}"),
                });
                if errors.len() >= MAX_ERRORS {
                    break;
                }
                continue;
            }
        };
        if let Some(o) = v.as_object() {
            ignored.extend(unused(o, used_columns(kind)).into_iter().map(String::from));
        }
        let r = match kind {
            DatasetKind::Preference => preference_line(&v).map(|x| pref.push(x)),
            DatasetKind::Sft => sft_line(&v).map(|x| sft.push(x)),
            DatasetKind::Prompts => prompts_line(&v).map(|x| prompts.push(x)),
        };
        if let Err((field, reason)) = r {
            errors.push(LineError {
                line: lineno,
                field,
                reason,
            });
            if errors.len() >= MAX_ERRORS {
                break;
            }
        }
    }
    if errors.is_empty() && pref.is_empty() && sft.is_empty() && prompts.is_empty() {
        errors.push(LineError {
            line: 0,
            field: "(file)".into(),
            reason: "no examples".into(),
        });
    }
    if !errors.is_empty() {
        return Err(DataError {
            file: file.to_string(),
            errors,
        });
    }
    let dataset = match kind {
        DatasetKind::Preference => Dataset::Preference(pref),
        DatasetKind::Sft => Dataset::Sft(sft),
        DatasetKind::Prompts => Dataset::Prompts(prompts),
    };
    let mut notes = vec![];
    if !ignored.is_empty() {
        notes.push(format!(
            "ignored column(s) herd does not use: {}",
            ignored.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok((dataset, notes))
}

/// A dataset file of one of `kinds`, whichever parses first (for jobs that
/// take more than one kind: list the stricter kinds first, since a
/// preference row would also read as a prompt, and an SFT dialog as one
/// too). The error is the last kind's.
pub fn parse_any(kinds: &[DatasetKind], bytes: &[u8], file: &str) -> Result<Dataset, DataError> {
    let mut last = None;
    for kind in kinds {
        match parse_bytes(*kind, bytes, file) {
            Ok(d) => return Ok(d),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one kind"))
}

pub fn parse_bytes(kind: DatasetKind, bytes: &[u8], file: &str) -> Result<Dataset, DataError> {
    parse_bytes_noting(kind, bytes, file).map(|(d, _)| d)
}

pub fn parse_bytes_noting(
    kind: DatasetKind,
    bytes: &[u8],
    file: &str,
) -> Result<(Dataset, Vec<String>), DataError> {
    let text = std::str::from_utf8(bytes).map_err(|e| DataError {
        file: file.to_string(),
        errors: vec![LineError {
            line: bytes[..e.valid_up_to()]
                .iter()
                .filter(|b| **b == b'\n')
                .count()
                + 1,
            field: "(line)".into(),
            reason: "not UTF-8".into(),
        }],
    })?;
    parse_noting(kind, text, file)
}

impl Dataset {
    pub fn kind(&self) -> DatasetKind {
        match self {
            Dataset::Preference(_) => DatasetKind::Preference,
            Dataset::Sft(_) => DatasetKind::Sft,
            Dataset::Prompts(_) => DatasetKind::Prompts,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Dataset::Preference(x) => x.len(),
            Dataset::Sft(x) => x.len(),
            Dataset::Prompts(x) => x.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Canonical JSONL (our own shape), so equal data hashes equal.
    pub fn to_jsonl(&self) -> String {
        fn lines<T: Serialize>(xs: &[T]) -> String {
            xs.iter()
                .map(|x| serde_json::to_string(x).expect("serializes") + "\n")
                .collect()
        }
        match self {
            Dataset::Preference(x) => lines(x),
            Dataset::Sft(x) => lines(x),
            Dataset::Prompts(x) => lines(x),
        }
    }

    /// Rows, strength histogram, share of 3-response rankings, answers.
    pub fn summary(&self) -> Value {
        match self {
            Dataset::Preference(x) => {
                let mut hist = serde_json::Map::new();
                for s in Strength::ALL {
                    hist.insert(
                        s.as_str().into(),
                        x.iter().filter(|e| e.strength == Some(s)).count().into(),
                    );
                }
                hist.insert(
                    "unspecified".into(),
                    x.iter().filter(|e| e.strength.is_none()).count().into(),
                );
                let three = x.iter().filter(|e| e.responses.len() == 3).count();
                serde_json::json!({"kind": "preference", "rows": x.len(), "strength": hist,
                    "three_response_share": three as f64 / x.len().max(1) as f64})
            }
            Dataset::Sft(x) => serde_json::json!({"kind": "sft", "rows": x.len(),
                "text_rows": x.iter().filter(|e| e.text.is_some()).count(),
                "turns_mean": x.iter().map(|e| e.messages.len()).sum::<usize>() as f64 / x.len().max(1) as f64}),
            Dataset::Prompts(x) => serde_json::json!({"kind": "prompts", "rows": x.len(),
                "with_answer": x.iter().filter(|e| e.answer.is_some()).count()}),
        }
    }
}
