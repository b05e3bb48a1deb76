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

/// At most this many errors are listed for one file (all are counted).
const MAX_ERRORS: usize = 5;

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

/// The row type of one dataset kind, so that a job asks for its rows by
/// type (`load_rows::<PromptExample>`) rather than matching the enum.
pub trait Row: Sized {
    const KIND: DatasetKind;
    /// The rows of `ds`, when it is of this kind.
    fn rows_of(ds: Dataset) -> Option<Vec<Self>>;
}

macro_rules! row_of_kind {
    ($row:ty, $variant:ident) => {
        impl Row for $row {
            const KIND: DatasetKind = DatasetKind::$variant;
            fn rows_of(ds: Dataset) -> Option<Vec<Self>> {
                match ds {
                    Dataset::$variant(rows) => Some(rows),
                    _ => None,
                }
            }
        }
    };
}
row_of_kind!(PreferenceExample, Preference);
row_of_kind!(SftExample, Sft);
row_of_kind!(PromptExample, Prompts);

/// One problem on one line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LineError {
    pub line: usize,
    /// The field at fault; `(line)` when the line is not a JSON object at
    /// all, `(file)` for the file as a whole.
    pub field: String,
    /// Where in the line, for JSON syntax errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    pub reason: String,
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.field.as_str(), self.column) {
            ("(line)", Some(c)) => write!(f, "line {}, column {c}: {}", self.line, self.reason),
            ("(line)", None) => write!(f, "line {}: {}", self.line, self.reason),
            ("(file)", _) => write!(f, "{}", self.reason),
            (field, _) => write!(f, "line {}: field `{field}`: {}", self.line, self.reason),
        }
    }
}

/// Why a file was refused: its first problems, how many lines had one,
/// and, when the rows read as another kind, which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError {
    pub file: String,
    /// The first [`MAX_ERRORS`] problems.
    pub errors: Vec<LineError>,
    /// Lines with a problem, all of them.
    pub bad_lines: usize,
    /// Non-blank lines read.
    pub lines: usize,
    /// "these rows look like preference rows …", when they do.
    pub hint: Option<String>,
}

impl std::error::Error for DataError {}

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: ", self.file)?;
        if self.lines > 0 {
            write!(f, "{} of {} line(s) bad", self.bad_lines, self.lines)?;
        } else {
            write!(f, "refused")?;
        }
        write!(f, "; the file was not imported")?;
        if let Some(h) = &self.hint {
            write!(f, ". {h}")?;
        }
        write!(f, ":")?;
        for e in &self.errors {
            write!(f, "\n  {e}")?;
        }
        if self.bad_lines > self.errors.len() {
            write!(
                f,
                "\n  … and {} more bad line(s)",
                self.bad_lines - self.errors.len()
            )?;
        }
        Ok(())
    }
}

impl DataError {
    /// One problem with the file as a whole.
    fn whole(file: &str, line: usize, reason: String) -> Self {
        DataError {
            file: file.to_string(),
            errors: vec![LineError {
                line,
                field: "(file)".into(),
                column: None,
                reason,
            }],
            bad_lines: 0,
            lines: 0,
            hint: None,
        }
    }
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
    parse_kind(kind, text, file, true)
}

/// What each kind's rows hold, for the hint when rows are of another kind.
fn looks(kind: DatasetKind) -> &'static str {
    match kind {
        DatasetKind::Preference => "prompt with chosen/rejected or ranked responses",
        DatasetKind::Sft => "messages, prompt/completion or text",
        DatasetKind::Prompts => "a prompt or messages to answer",
    }
}

fn parse_kind(
    kind: DatasetKind,
    text: &str,
    file: &str,
    sniff: bool,
) -> Result<(Dataset, Vec<String>), DataError> {
    if text.trim_start().starts_with('[') {
        return Err(DataError::whole(
            file,
            1,
            "this is a JSON array; herd reads JSON Lines, one object per line (convert it with `jq -c '.[]' FILE > FILE.jsonl`)".into(),
        ));
    }
    let mut ignored = std::collections::BTreeSet::new();
    let mut errors = vec![];
    let (mut bad_lines, mut lines) = (0, 0);
    let (mut pref, mut sft, mut prompts) = (vec![], vec![], vec![]);
    // Preference rows ranking a response above itself.
    let mut ties = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        lines += 1;
        let lineno = i + 1;
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(e) => {
                bad_lines += 1;
                if errors.len() < MAX_ERRORS {
                    // serde's text ends "at line 1 column C": the line is ours.
                    let msg = e.to_string();
                    let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
                    errors.push(LineError {
                        line: lineno,
                        field: "(line)".into(),
                        column: Some(e.column()),
                        reason: format!("not valid JSON: {msg}"),
                    });
                }
                continue;
            }
        };
        if let Some(o) = v.as_object() {
            ignored.extend(unused(o, used_columns(kind)).into_iter().map(String::from));
        }
        let r = match kind {
            DatasetKind::Preference => preference_line(&v).map(|x| {
                if x.responses.windows(2).any(|w| w[0] == w[1]) {
                    ties.push(lineno);
                }
                pref.push(x)
            }),
            DatasetKind::Sft => sft_line(&v).map(|x| sft.push(x)),
            DatasetKind::Prompts => prompts_line(&v).map(|x| prompts.push(x)),
        };
        if let Err((field, reason)) = r {
            bad_lines += 1;
            if errors.len() < MAX_ERRORS {
                errors.push(LineError {
                    line: lineno,
                    field,
                    column: None,
                    reason,
                });
            }
        }
    }
    if errors.is_empty() && pref.is_empty() && sft.is_empty() && prompts.is_empty() {
        return Err(DataError::whole(file, 0, "no examples".into()));
    }
    if !errors.is_empty() {
        // Rows of another kind fail every line alike: say which kind they are.
        let hint = sniff
            .then(|| {
                [
                    DatasetKind::Preference,
                    DatasetKind::Sft,
                    DatasetKind::Prompts,
                ]
                .into_iter()
                .filter(|k| *k != kind)
                .find(|k| parse_kind(*k, text, file, false).is_ok())
            })
            .flatten()
            .map(|k| {
                format!(
                    "These rows look like {} rows ({}): import with --kind {}",
                    k.as_str(),
                    looks(k),
                    k.as_str()
                )
            });
        return Err(DataError {
            file: file.to_string(),
            errors,
            bad_lines,
            lines,
            hint,
        });
    }
    let dataset = match kind {
        DatasetKind::Preference => Dataset::Preference(pref),
        DatasetKind::Sft => Dataset::Sft(sft),
        DatasetKind::Prompts => Dataset::Prompts(prompts),
    };
    let mut notes = vec![];
    if !ties.is_empty() {
        let shown: Vec<String> = ties.iter().take(5).map(|l| l.to_string()).collect();
        notes.push(format!(
            "{} row(s) rank a response above an identical one (line(s) {}{}): such a pair teaches nothing (its DPO and RM loss terms are constant)",
            ties.len(),
            shown.join(", "),
            if ties.len() > 5 { ", …" } else { "" }
        ));
    }
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
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1;
        DataError {
            file: file.to_string(),
            errors: vec![LineError {
                line,
                field: "(line)".into(),
                column: None,
                reason: "not UTF-8".into(),
            }],
            bad_lines: 1,
            lines: 0,
            hint: None,
        }
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
