//! Verifiable rewards: rules that score a completion against its prompt's
//! `answer`, each a pure function of the two, so a reward recorded once is
//! the reward any reproduction computes. (A user's own program is the other
//! kind of verifier: an artifact run in the job's directory.)
//!
//! * `exact`: 1 when the completion, normalised, equals the answer
//!   normalised (case, surrounding space and punctuation, inner runs of
//!   space), else 0;
//! * `number`: 1 when the last number in the completion equals the answer's
//!   number within `tolerance` (absolute); else 0, or with a `scale`
//!   partial credit `exp(-|x - answer| / scale)` (closer is better, as the
//!   Llama 3 loop's annotators judge a checkable task);
//! * `regex`: 1 when the pattern matches anywhere in the completion
//!   (`{answer}` in the pattern stands for the answer, escaped);
//! * `format`: 1 when the pattern matches the whole completion (e.g.
//!   `(?s)<think>.*</think>\s*\S.*`), else 0.

use regex::Regex;

/// A built-in rule, compiled once per job.
#[derive(Debug, Clone)]
pub enum Rule {
    Exact,
    Number {
        tolerance: f64,
        scale: f64,
    },
    /// Compiled once; a pattern naming `{answer}` is compiled per answer.
    Regex {
        pattern: String,
        fixed: Option<Regex>,
    },
    Format(Regex),
}

/// The rule names `verifier_rule` takes.
pub const RULES: [&str; 4] = ["exact", "number", "regex", "format"];

impl Rule {
    /// A rule by name; `pattern` for regex and format (checked here, so a
    /// bad pattern is refused at submit).
    pub fn new(name: &str, pattern: &str, tolerance: f64) -> Result<Rule, String> {
        Self::with_scale(name, pattern, tolerance, 0.0)
    }

    /// As `new`, with `number`'s partial-credit `scale` (0: none).
    pub fn with_scale(
        name: &str,
        pattern: &str,
        tolerance: f64,
        scale: f64,
    ) -> Result<Rule, String> {
        if !(scale.is_finite() && scale >= 0.0) {
            return Err(format!(
                "verifier_scale must be finite and at least 0, got {scale}"
            ));
        }
        let compile = |p: &str| {
            Regex::new(p)
                .map_err(|e| format!("verifier_pattern {p:?} is not a regular expression: {e}"))
        };
        match name {
            "exact" => Ok(Rule::Exact),
            "number" if tolerance.is_finite() && tolerance >= 0.0 => {
                Ok(Rule::Number { tolerance, scale })
            }
            "number" => Err(format!(
                "verifier_tolerance must be finite and at least 0, got {tolerance}"
            )),
            "regex" | "format" if pattern.is_empty() => {
                Err(format!("the {name} verifier needs verifier_pattern"))
            }
            "regex" => {
                let fixed = compile(&pattern.replace("{answer}", ""))?;
                Ok(Rule::Regex {
                    pattern: pattern.to_string(),
                    fixed: (!pattern.contains("{answer}")).then_some(fixed),
                })
            }
            "format" => Ok(Rule::Format(compile(&format!("^(?:{pattern})$"))?)),
            other => Err(format!(
                "verifier_rule {other:?} is not one of {}",
                RULES.join(", ")
            )),
        }
    }

    /// Whether the rule reads the prompt's answer (every rule but `format`,
    /// and `regex` only when its pattern names it).
    pub fn needs_answer(&self) -> bool {
        match self {
            Rule::Exact | Rule::Number { .. } => true,
            Rule::Regex { fixed, .. } => fixed.is_none(),
            Rule::Format(_) => false,
        }
    }

    /// The reward of `completion` for a prompt whose answer is `answer`.
    pub fn score(&self, completion: &str, answer: Option<&str>) -> f32 {
        let answer = answer.unwrap_or("");
        let hit = match self {
            Rule::Exact => normalise(completion) == normalise(answer),
            Rule::Number { tolerance, scale } => {
                return match (last_number(completion), last_number(answer)) {
                    (Some(x), Some(y)) if (x - y).abs() <= *tolerance => 1.0,
                    (Some(x), Some(y)) if *scale > 0.0 => (-(x - y).abs() / scale).exp() as f32,
                    _ => 0.0,
                }
            }
            Rule::Regex {
                fixed: Some(re), ..
            } => re.is_match(completion),
            Rule::Regex {
                pattern,
                fixed: None,
            } => {
                let p = pattern.replace("{answer}", &regex::escape(answer.trim()));
                Regex::new(&p).is_ok_and(|re| re.is_match(completion))
            }
            Rule::Format(re) => re.is_match(completion),
        };
        if hit {
            1.0
        } else {
            0.0
        }
    }
}

/// Lower case, inner whitespace runs as one space, surrounding whitespace
/// and punctuation gone.
fn normalise(s: &str) -> String {
    let words: Vec<&str> = s.split_whitespace().collect();
    words
        .join(" ")
        .trim_matches(|c: char| c.is_ascii_punctuation() || c.is_whitespace())
        .to_lowercase()
}

/// The last number in `s`: an optional sign, digits, an optional fraction
/// and exponent; thousands separators (`1,234`) are read through.
pub fn last_number(s: &str) -> Option<f64> {
    let re = number_pattern();
    re.find_iter(s)
        .last()
        .and_then(|m| m.as_str().replace(',', "").parse().ok())
}

fn number_pattern() -> &'static Regex {
    static RE: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
            .expect("the number pattern compiles")
    })
}

/// A user's verifier program (an artifact of kind `verifier`): run in the
/// job's directory with one JSON line per completion on stdin
/// (`prompt`, `completion`, `answer`, `group`, `index`), it prints one
/// `{"reward": x}` line per completion on stdout, in order.
#[derive(Debug, Clone)]
pub struct Program {
    /// An executable copy of the recorded file.
    pub path: std::path::PathBuf,
    pub workdir: std::path::PathBuf,
    /// Per call (one step's completions).
    pub timeout: std::time::Duration,
    /// Address-space limit of the process.
    pub memory_bytes: u64,
}

/// What a verifier program is told about one completion.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scored<'a> {
    pub prompt: &'a [herd_engine::chat::Message],
    pub completion: &'a str,
    pub answer: Option<&'a str>,
    pub group: usize,
    pub index: usize,
}

impl Program {
    /// Copy the recorded file (read-only in the blob store) to `workdir`
    /// as an executable.
    pub fn install(
        recorded: &std::path::Path,
        workdir: &std::path::Path,
        timeout: std::time::Duration,
        memory_bytes: u64,
    ) -> Result<Program, String> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(workdir).map_err(|e| format!("{}: {e}", workdir.display()))?;
        let path = workdir.join("verifier");
        std::fs::copy(recorded, &path)
            .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
            .map_err(|e| format!("installing the verifier at {}: {e}", path.display()))?;
        Ok(Program {
            path,
            workdir: workdir.to_path_buf(),
            timeout,
            memory_bytes,
        })
    }

    /// One reward per item, or an error that says what the program did.
    pub fn score(&self, items: &[Scored]) -> Result<Vec<f32>, String> {
        use std::io::{Read, Write};
        use std::process::{Command, Stdio};
        let mut input = Vec::new();
        for it in items {
            serde_json::to_writer(&mut input, it).map_err(|e| e.to_string())?;
            input.push(b'\n');
        }
        let mut cmd = Command::new(&self.path);
        cmd.current_dir(&self.workdir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let limit = self.memory_bytes;
        // SAFETY: setrlimit is async-signal-safe; nothing else runs
        // between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let rl = libc::rlimit {
                    rlim_cur: limit as libc::rlim_t,
                    rlim_max: limit as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("the verifier program could not start: {e}"))?;
        // Writing, reading and waiting side by side: a program that reads
        // everything before it writes, or writes before it reads, both work.
        let mut stdin = child.stdin.take().expect("piped");
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let mut stdout = child.stdout.take().expect("piped");
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = stdout.read_to_end(&mut out);
            out
        });
        let mut stderr = child.stderr.take().expect("piped");
        let errs = std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = stderr.read_to_end(&mut out);
            out
        });
        let started = std::time::Instant::now();
        let status = loop {
            match child.try_wait().map_err(|e| e.to_string())? {
                Some(s) => break s,
                None if started.elapsed() > self.timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "the verifier program did not finish scoring {} completions within {:?}; it was stopped",
                        items.len(),
                        self.timeout
                    ));
                }
                None => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        };
        let _ = writer.join();
        let out = reader.join().unwrap_or_default();
        let err = errs.join().unwrap_or_default();
        let tail = |b: &[u8]| {
            let t = String::from_utf8_lossy(b);
            let t = t.trim();
            let start = t.len().saturating_sub(2000);
            t.get(start..).unwrap_or(t).to_string()
        };
        if !status.success() {
            return Err(format!(
                "the verifier program failed ({status}): {}",
                tail(&err)
            ));
        }
        let text = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != items.len() {
            return Err(format!(
                "the verifier program printed {} reward line(s) for {} completions",
                lines.len(),
                items.len()
            ));
        }
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l).map_err(|_| {
                    format!(
                        "the verifier program's line {}: {:?} is not {{\"reward\": number}}",
                        i + 1,
                        tail(l.as_bytes())
                    )
                })?;
                match v.get("reward").and_then(|r| r.as_f64()) {
                    Some(r) if r.is_finite() => Ok(r as f32),
                    _ => Err(format!(
                        "the verifier program's line {}: {l} has no finite `reward`",
                        i + 1
                    )),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str, pattern: &str) -> Rule {
        Rule::new(name, pattern, 1e-6).unwrap()
    }

    #[test]
    fn exact_normalises_case_space_and_punctuation() {
        let r = rule("exact", "");
        assert_eq!(r.score("  Paris. ", Some("paris")), 1.0);
        assert_eq!(r.score("New   York", Some("new york!")), 1.0);
        assert_eq!(r.score("Paris, France", Some("Paris")), 0.0);
        assert_eq!(r.score("anything", None), 0.0);
        assert!(r.needs_answer());
    }

    #[test]
    fn number_takes_the_last_number_within_tolerance() {
        let r = Rule::new("number", "", 0.01).unwrap();
        assert_eq!(r.score("3 + 4 = 7", Some("7")), 1.0);
        assert_eq!(r.score("first 7, then 8", Some("7")), 0.0);
        assert_eq!(r.score("about 3.141", Some("3.14")), 1.0);
        assert_eq!(r.score("total: 1,234", Some("1234")), 1.0);
        assert_eq!(r.score("it is -5", Some("-5")), 1.0);
        assert_eq!(r.score("1.5e3 m", Some("1500")), 1.0);
        assert_eq!(r.score("no digits", Some("0")), 0.0);
        assert_eq!(r.score("42", Some("not a number")), 0.0);
        assert!(Rule::new("number", "", -1.0).is_err());
        // Partial credit: closer is better, exact is 1.
        let r = Rule::with_scale("number", "", 0.0, 100.0).unwrap();
        assert_eq!(r.score("346", Some("346")), 1.0);
        let (near, far) = (r.score("356", Some("346")), r.score("946", Some("346")));
        assert!(
            (near - (-0.1f32).exp()).abs() < 1e-6 && far < near && far > 0.0,
            "{near} {far}"
        );
        assert_eq!(r.score("no number", Some("346")), 0.0);
        assert!(Rule::with_scale("number", "", 0.0, -1.0).is_err());
        assert!(Rule::new("number", "", f64::NAN).is_err());
    }

    #[test]
    fn regex_matches_anywhere_and_can_name_the_answer() {
        let r = rule("regex", r"answer is \d+");
        assert_eq!(r.score("so the answer is 12.", None), 1.0);
        assert_eq!(r.score("so the answer: 12", None), 0.0);
        assert!(!r.needs_answer());
        let r = rule("regex", r"\\boxed\{{answer}\}");
        assert!(r.needs_answer());
        assert_eq!(
            r.score("thus \\boxed{1+1} ok", Some("1+1")),
            1.0,
            "the answer is escaped"
        );
        assert_eq!(r.score("thus \\boxed{11}", Some("1+1")), 0.0);
    }

    #[test]
    fn format_must_match_the_whole_completion() {
        let r = rule("format", r"(?s)<think>.*</think>\s*\S.*");
        assert_eq!(r.score("<think>hmm</think> 42", None), 1.0);
        assert_eq!(r.score("<think>a\nb</think>\n42", None), 1.0);
        assert_eq!(
            r.score("42 <think>hmm</think> 42", None),
            0.0,
            "whole completion"
        );
        assert_eq!(r.score("<think>hmm</think>", None), 0.0);
    }

    #[test]
    fn bad_rules_and_patterns_are_refused_by_name() {
        assert!(Rule::new("fuzzy", "", 0.0)
            .unwrap_err()
            .contains("exact, number, regex, format"));
        assert!(Rule::new("regex", "", 0.0)
            .unwrap_err()
            .contains("needs verifier_pattern"));
        assert!(Rule::new("format", "(unclosed", 0.0)
            .unwrap_err()
            .contains("not a regular expression"));
    }

    fn program(dir: &std::path::Path, body: &str, timeout_ms: u64) -> Program {
        let src = dir.join("src.sh");
        std::fs::write(&src, format!("#!/bin/sh\n{body}\n")).unwrap();
        Program::install(
            &src,
            &dir.join("work"),
            std::time::Duration::from_millis(timeout_ms),
            1 << 30,
        )
        .unwrap()
    }

    fn items() -> Vec<Scored<'static>> {
        (0..3)
            .map(|i| Scored {
                prompt: &[],
                completion: "x",
                answer: Some("1"),
                group: 0,
                index: i,
            })
            .collect()
    }

    #[test]
    fn a_program_scores_every_completion_in_order() {
        let dir = tempfile::tempdir().unwrap();
        // Reads each line and answers with its index as the reward.
        let p = program(
            dir.path(),
            r#"while read -r line; do i=$(echo "$line" | sed 's/.*"index":\([0-9]*\).*/\1/'); echo "{\"reward\": $i}"; done"#,
            10_000,
        );
        assert_eq!(p.score(&items()).unwrap(), vec![0.0, 1.0, 2.0]);
    }

    #[test]
    fn programs_that_hang_crash_print_garbage_or_nan_fail_clearly() {
        let dir = tempfile::tempdir().unwrap();
        for (body, says) in [
            ("sleep 30", "did not finish scoring 3 completions"),
            ("echo boom >&2; exit 3", "failed (exit status: 3): boom"),
            (
                "cat >/dev/null; echo hello; echo 1; echo 2",
                "line 1: \"hello\" is not",
            ),
            (
                "cat >/dev/null; echo '{\"reward\": 1}'",
                "printed 1 reward line(s) for 3 completions",
            ),
            (
                "cat >/dev/null; for i in 1 2 3; do echo '{\"reward\": \"NaN\"}'; done",
                "has no finite `reward`",
            ),
        ] {
            let p = program(dir.path(), body, 500);
            let err = p.score(&items()).unwrap_err();
            assert!(err.contains(says), "{body}: {err}");
        }
    }
}
