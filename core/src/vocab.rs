//! The words both sides of the API use, each parsed once at the edge:
//! job kinds, artifact kinds, blob hashes and input references.
//!
//! Each is a type with `FromStr`/`Display` and serde as its string form, so
//! what is recorded and sent over the wire stays the same text it always was
//! while the code in between handles typed values.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Serde as the `Display`/`FromStr` string form.
macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<str>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

/// What a job does. `External` is a run that happened outside herd and was
/// recorded through `/runs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum JobKind {
    Rm,
    Sample,
    Sft,
    Dpo,
    Average,
    Curate,
    Eval,
    Annotate,
    Mix,
    /// A LoRA adapter merged into its base: a plain checkpoint.
    Merge,
    /// A model's completions of prompts (no reward model).
    Generate,
    /// A checkpoint given a chat template (and its special tokens).
    ChatFormat,
    /// Online RL with verifiable rewards (GRPO and its variants).
    Grpo,
    External,
}

impl JobKind {
    /// The kinds herd runs itself (every kind but `External`).
    pub const RECIPES: [JobKind; 13] = [
        JobKind::Rm,
        JobKind::Sample,
        JobKind::Sft,
        JobKind::Dpo,
        JobKind::Average,
        JobKind::Curate,
        JobKind::Eval,
        JobKind::Annotate,
        JobKind::Mix,
        JobKind::Merge,
        JobKind::Generate,
        JobKind::ChatFormat,
        JobKind::Grpo,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Rm => "rm",
            JobKind::Sample => "sample",
            JobKind::Sft => "sft",
            JobKind::Dpo => "dpo",
            JobKind::Average => "average",
            JobKind::Curate => "curate",
            JobKind::Eval => "eval",
            JobKind::Annotate => "annotate",
            JobKind::Mix => "mix",
            JobKind::Merge => "merge",
            JobKind::Generate => "generate",
            JobKind::ChatFormat => "chat_format",
            JobKind::Grpo => "grpo",
            JobKind::External => "external",
        }
    }

    /// Whether herd runs this kind (false for external runs).
    pub fn is_recipe(self) -> bool {
        self != JobKind::External
    }
}

impl FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        JobKind::RECIPES
            .into_iter()
            .chain([JobKind::External])
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown job kind {s:?} (expected one of {})",
                    JobKind::RECIPES.map(|k| k.as_str()).join(", ")
                )
            })
    }
}

impl fmt::Display for JobKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
string_serde!(JobKind);

/// What an artifact is: a checkpoint, a LoRA adapter of one, one of the
/// dataset kinds, or a cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ArtifactKind {
    Checkpoint,
    Preference,
    Sft,
    Prompts,
    Cache,
    /// A PEFT LoRA adapter directory; its summary's `base` names the
    /// checkpoint it adapts.
    Adapter,
    /// An online RL job's samples (JSON Lines): each completion with its
    /// rewards, advantage, group, step and the sampler's log-prob.
    Rollouts,
    /// A program that scores completions (JSON Lines in, `{"reward": x}`
    /// lines out), recorded by content like any input.
    Verifier,
}

impl ArtifactKind {
    pub const ALL: [ArtifactKind; 8] = [
        ArtifactKind::Checkpoint,
        ArtifactKind::Preference,
        ArtifactKind::Sft,
        ArtifactKind::Prompts,
        ArtifactKind::Cache,
        ArtifactKind::Adapter,
        ArtifactKind::Rollouts,
        ArtifactKind::Verifier,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ArtifactKind::Checkpoint => "checkpoint",
            ArtifactKind::Preference => "preference",
            ArtifactKind::Sft => "sft",
            ArtifactKind::Prompts => "prompts",
            ArtifactKind::Cache => "cache",
            ArtifactKind::Adapter => "adapter",
            ArtifactKind::Rollouts => "rollouts",
            ArtifactKind::Verifier => "verifier",
        }
    }

    /// A directory of files (a tree in the blob store), not one file.
    pub fn is_directory(self) -> bool {
        matches!(self, ArtifactKind::Checkpoint | ArtifactKind::Adapter)
    }

    pub fn is_dataset(self) -> bool {
        matches!(
            self,
            ArtifactKind::Preference | ArtifactKind::Sft | ArtifactKind::Prompts
        )
    }
}

impl FromStr for ArtifactKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ArtifactKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown artifact kind {s:?} (expected one of {})",
                    ArtifactKind::ALL.map(|k| k.as_str()).join(", ")
                )
            })
    }
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
string_serde!(ArtifactKind);

/// A blob's name: the sha256 of its bytes as 64 lowercase hex digits (the
/// only spelling the blob store uses, so the only one accepted).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlobHash(String);

impl BlobHash {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_valid(s: &str) -> bool {
        s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

impl FromStr for BlobHash {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if BlobHash::is_valid(s) {
            Ok(BlobHash(s.to_string()))
        } else {
            Err(format!(
                "{s:?} is not a content hash (64 lowercase hex digits, a sha256)"
            ))
        }
    }
}

impl fmt::Display for BlobHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
string_serde!(BlobHash);

/// A job input: a stored blob, or an output of another job (which may not
/// have run yet), written `job:<id>/<output>`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum InputRef {
    Blob(BlobHash),
    JobOutput { job: Uuid, output: String },
}

impl InputRef {
    /// A reference to output `output` of job `job`.
    pub fn job_output(job: Uuid, output: &str) -> InputRef {
        InputRef::JobOutput {
            job,
            output: output.to_string(),
        }
    }
}

impl FromStr for InputRef {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("job:") {
            let (id, output) = rest
                .split_once('/')
                .ok_or_else(|| format!("{s:?} is not job:<id>/<output>"))?;
            let job = id
                .parse::<Uuid>()
                .map_err(|_| format!("{s:?}: {id:?} is not a job id"))?;
            if output.is_empty()
                || !output
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
            {
                return Err(format!("{s:?}: {output:?} is not an output name"));
            }
            return Ok(InputRef::job_output(job, output));
        }
        if BlobHash::is_valid(s) {
            return Ok(InputRef::Blob(BlobHash(s.to_string())));
        }
        Err(format!(
            "{s:?} is neither a content hash (64 lowercase hex digits) nor job:<id>/<output>"
        ))
    }
}

impl fmt::Display for InputRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputRef::Blob(h) => f.write_str(h.as_str()),
            InputRef::JobOutput { job, output } => write!(f, "job:{job}/{output}"),
        }
    }
}
string_serde!(InputRef);

/// What a job asks of a cluster executor (Slurm): CPUs, GPUs, memory and a
/// time limit. Every field is optional: a job's request overrides the
/// daemon's defaults for its kind field by field. Written as text
/// `cpus=4,gpus=1,mem=16G,time=2:00:00` (mem in M/G, time as Slurm writes
/// it: minutes, `H:MM:SS` or `D-HH:MM:SS`); a local executor ignores it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Resources {
    pub cpus: Option<u32>,
    pub gpus: Option<u32>,
    pub mem_mb: Option<u64>,
    pub time_min: Option<u32>,
}

impl Resources {
    /// `self` where set, else `defaults`.
    pub fn over(self, defaults: Resources) -> Resources {
        Resources {
            cpus: self.cpus.or(defaults.cpus),
            gpus: self.gpus.or(defaults.gpus),
            mem_mb: self.mem_mb.or(defaults.mem_mb),
            time_min: self.time_min.or(defaults.time_min),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Resources::default()
    }
}

/// Minutes from Slurm's time formats: `M`, `M:SS`, `H:MM:SS`, `D-H`,
/// `D-H:MM`, `D-H:MM:SS` (seconds round up to a minute).
fn parse_minutes(s: &str) -> Option<u32> {
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u32>().ok()?, Some(r)),
        None => (0, None),
    };
    let nums = |t: &str| -> Option<Vec<u32>> { t.split(':').map(|x| x.parse().ok()).collect() };
    let secs: u64 = match rest {
        Some(r) => match nums(r)?.as_slice() {
            [h] => *h as u64 * 3600,
            [h, m] => *h as u64 * 3600 + *m as u64 * 60,
            [h, m, sec] => *h as u64 * 3600 + *m as u64 * 60 + *sec as u64,
            _ => return None,
        },
        None => match nums(s)?.as_slice() {
            [m] => *m as u64 * 60,
            [m, sec] => *m as u64 * 60 + *sec as u64,
            [h, m, sec] => *h as u64 * 3600 + *m as u64 * 60 + *sec as u64,
            _ => return None,
        },
    } + days as u64 * 86400;
    u32::try_from(secs.div_ceil(60)).ok()
}

impl FromStr for Resources {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut r = Resources::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| {
                format!("{part:?} is not key=value (keys: cpus, gpus, mem, time)")
            })?;
            let number = |what: &str| -> Result<u64, String> {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{key}={value:?}: {what}"))
            };
            match key {
                "cpus" => {
                    let n = number("a number of CPUs")?;
                    if n == 0 || n > 4096 {
                        return Err(format!("cpus={n}: between 1 and 4096"));
                    }
                    r.cpus = Some(n as u32)
                }
                "gpus" => {
                    let n = number("a number of GPUs")?;
                    if n > 64 {
                        return Err(format!("gpus={n}: at most 64"));
                    }
                    r.gpus = Some(n as u32)
                }
                "mem" => {
                    let (digits, unit) =
                        match value.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
                            Some((i, _)) => value.split_at(i),
                            None => (value, "M"),
                        };
                    let n: u64 = digits
                        .parse()
                        .map_err(|_| format!("mem={value:?}: a size like 512M or 16G"))?;
                    let mb = match unit {
                        "M" | "m" | "MB" => n,
                        "G" | "g" | "GB" => n.saturating_mul(1024),
                        "T" | "t" | "TB" => n.saturating_mul(1024 * 1024),
                        _ => return Err(format!("mem={value:?}: a size like 512M or 16G")),
                    };
                    if mb == 0 {
                        return Err("mem=0: at least 1M".into());
                    }
                    r.mem_mb = Some(mb)
                }
                "time" => {
                    let m = parse_minutes(value).filter(|m| *m > 0).ok_or_else(|| {
                        format!("time={value:?}: minutes, H:MM:SS or D-HH:MM:SS, at least a minute")
                    })?;
                    r.time_min = Some(m)
                }
                _ => return Err(format!("unknown resource `{key}` (cpus, gpus, mem, time)")),
            }
        }
        Ok(r)
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = vec![];
        if let Some(c) = self.cpus {
            parts.push(format!("cpus={c}"));
        }
        if let Some(g) = self.gpus {
            parts.push(format!("gpus={g}"));
        }
        if let Some(m) = self.mem_mb {
            parts.push(if m % 1024 == 0 {
                format!("mem={}G", m / 1024)
            } else {
                format!("mem={m}M")
            });
        }
        if let Some(t) = self.time_min {
            parts.push(format!("time={}:{:02}:00", t / 60, t % 60));
        }
        f.write_str(&parts.join(","))
    }
}
string_serde!(Resources);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_word_round_trips_through_its_text() {
        for k in JobKind::RECIPES.into_iter().chain([JobKind::External]) {
            assert_eq!(k.to_string().parse::<JobKind>(), Ok(k));
            assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        }
        for a in ArtifactKind::ALL {
            assert_eq!(a.to_string().parse::<ArtifactKind>(), Ok(a));
        }
        for text in [
            "cpus=4,gpus=1,mem=16G,time=2:00:00",
            "mem=1536M,time=0:01:00",
            "",
        ] {
            let r: Resources = text.parse().unwrap();
            assert_eq!(r.to_string(), text);
        }
        let r: Resources = "time=1-00:30,mem=2g".parse().unwrap();
        assert_eq!((r.time_min, r.mem_mb), (Some(24 * 60 + 30), Some(2048)));
        assert_eq!("time=90".parse::<Resources>().unwrap().time_min, Some(90));
        assert_eq!("time=1:30".parse::<Resources>().unwrap().time_min, Some(2));
        for bad in ["cpus=0", "mem=12X", "time=abc", "disk=1", "cpus"] {
            assert!(bad.parse::<Resources>().is_err(), "{bad}");
        }
        let h = "ab".repeat(32);
        let job = Uuid::now_v7();
        for text in [h.clone(), format!("job:{job}/checkpoint")] {
            let r: InputRef = text.parse().unwrap();
            assert_eq!(r.to_string(), text);
            let v: InputRef = serde_json::from_value(serde_json::json!(text)).unwrap();
            assert_eq!(v, r);
        }
    }

    #[test]
    fn malformed_words_are_refused_saying_why() {
        assert!("AB"
            .repeat(32)
            .parse::<BlobHash>()
            .unwrap_err()
            .contains("lowercase"));
        assert!("job:garbage"
            .parse::<InputRef>()
            .unwrap_err()
            .contains("job:<id>/<output>"));
        let bad_output = format!("job:{}/a/b", Uuid::now_v7());
        assert!(bad_output
            .parse::<InputRef>()
            .unwrap_err()
            .contains("output name"));
        assert!("train"
            .parse::<JobKind>()
            .unwrap_err()
            .contains("expected one of"));
    }
}

/// The longest name (experiment, job, run, metric, artifact) accepted.
pub const MAX_NAME_CHARS: usize = 200;

/// Names are text people read in terminals and pages: 1 to 200 characters,
/// no leading or trailing spaces, no control characters (ESC would let a
/// name clear a screen or retitle a terminal), no bidirectional overrides
/// (which reorder what is shown). The error names the offending character.
pub fn check_name(name: &str) -> Result<(), String> {
    let n = name.chars().count();
    if n == 0 || n > MAX_NAME_CHARS {
        return Err(format!("1 to {MAX_NAME_CHARS} characters, not {n}"));
    }
    if name.trim() != name {
        return Err(format!("{name:?} starts or ends with spaces"));
    }
    if let Some((i, c)) = name.chars().enumerate().find(|(_, c)| unreadable(*c)) {
        return Err(format!(
            "character {} U+{:04X} at position {i} is {}",
            i + 1,
            c as u32,
            if c.is_control() {
                "a control character"
            } else {
                "a bidirectional override"
            }
        ));
    }
    Ok(())
}

/// A character a name may not hold (see [`check_name`]).
pub fn unreadable(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `s` as a terminal may print it: unreadable characters (see
/// [`check_name`]) written as `\u{..}` escapes, for names recorded before
/// they were checked.
/// The name among `names` that `typed` was most likely meant to be, for a
/// did-you-mean: the nearest by edit distance (transpositions count one),
/// within a third of the longer name's length (at least 2), else one that
/// contains what was typed. One rule for every did-you-mean herd prints.
pub fn nearest<'a>(typed: &str, names: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let names: Vec<&str> = names.into_iter().collect();
    names
        .iter()
        .map(|n| (strsim::damerau_levenshtein(typed, n), *n))
        .filter(|(d, n)| *d <= 2.max(typed.len().max(n.len()) / 3))
        .min()
        .map(|(_, n)| n)
        .or_else(|| names.iter().copied().filter(|n| n.contains(typed)).min())
}

pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(unreadable) {
        return std::borrow::Cow::Borrowed(s);
    }
    std::borrow::Cow::Owned(
        s.chars()
            .map(|c| {
                if unreadable(c) {
                    format!("\\u{{{:x}}}", c as u32)
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

#[cfg(test)]
mod name_tests {
    use super::*;

    #[test]
    fn names_refuse_escapes_controls_bidi_and_padding() {
        check_name("sft lr=1e-5 / run 3 ✓").unwrap();
        for bad in [
            "",
            " x",
            "x ",
            "a\u{1b}]0;pwned\u{7}",
            "a\nb",
            "nul\0",
            "abc\u{202E}def",
            &"x".repeat(201),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("a\u{1b}b").unwrap_err().contains("U+001B"));
        assert_eq!(printable("a\u{1b}[2Jb\u{202E}"), "a\\u{1b}[2Jb\\u{202e}");
    }
}

#[cfg(test)]
mod nearest_tests {
    use super::nearest;

    #[test]
    fn a_typo_finds_the_name_meant_and_nonsense_finds_none() {
        let names = [
            "lr",
            "beta",
            "steps",
            "max_seq_len",
            "loss",
            "reward_accuracy",
        ];
        assert_eq!(nearest("lrr", names), Some("lr"));
        assert_eq!(nearest("los", names), Some("loss"));
        assert_eq!(
            nearest("stpes", names),
            Some("steps"),
            "a transposition counts one"
        );
        assert_eq!(
            nearest("reward_acc", names),
            Some("reward_accuracy"),
            "a prefix is contained"
        );
        assert_eq!(nearest("temperature", names), None);
    }
}
