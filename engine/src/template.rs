//! Chat templates: the Jinja a model ships, rendered as transformers'
//! `apply_chat_template` renders it.
//!
//! Why its own module: which template a directory carries, and how Jinja is
//! evaluated, are questions apart from what the rendered text means for
//! training (that is `chat.rs`). transformers renders with Jinja2's
//! immutable sandbox, `trim_blocks` and `lstrip_blocks` on, loop controls,
//! its own `tojson` (Python's `json.dumps`, no HTML escaping), and the
//! globals `raise_exception` and `strftime_now`; `{% generation %}` blocks
//! mark what the assistant writes. minijinja (the engine Hugging Face's
//! text-generation-inference uses) with Python's string and dict methods
//! gives the same text. No model family is special-cased here: a template
//! that calls something missing fails with minijinja's own error and line.

use std::path::Path;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use crate::error::{EngineError, Result};

/// Where a directory's template was found, in transformers' order of
/// precedence: `chat_template.jinja`, then `chat_template.json`, then
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of
/// named templates of which `default` is used).
pub fn find_in_dir(dir: &Path) -> Result<Option<(String, String)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let text = std::fs::read_to_string(&jinja).map_err(|e| EngineError::io(&jinja, e))?;
        return Ok(Some((text, jinja.display().to_string())));
    }
    for (file, field) in [
        ("chat_template.json", "chat_template"),
        ("tokenizer_config.json", "chat_template"),
    ] {
        let path = dir.join(file);
        if !path.is_file() {
            continue;
        }
        let origin = path.display().to_string();
        let v = read_json(&path)?;
        match v.get(field) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(s)) => return Ok(Some((s.clone(), origin))),
            Some(serde_json::Value::Array(named)) => {
                let default = named
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"));
                let names: Vec<&str> = named
                    .iter()
                    .filter_map(|t| t.get("name").and_then(|n| n.as_str()))
                    .collect();
                return match default
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                {
                    Some(s) => Ok(Some((
                        s.to_string(),
                        format!("{origin} (template `default`)"),
                    ))),
                    None => Err(EngineError::config(
                        &origin,
                        field,
                        format!(
                            "a list of named templates with no usable `default` (names: {names:?})"
                        ),
                    )),
                };
            }
            Some(other) => {
                return Err(EngineError::config(
                    &origin,
                    field,
                    format!(
                        "expected a string or a list of named templates, got {}",
                        kind_of(other)
                    ),
                ))
            }
        }
    }
    Ok(None)
}

pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| {
        EngineError::config(
            &path.display().to_string(),
            "(file)",
            format!("not valid JSON: {e}"),
        )
    })
}

fn kind_of(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "a list",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Marks where a `{% generation %}` block starts and ends in rendered text
/// (private-use code points; removed before anything else sees the text).
const GEN_START: char = '\u{10FFF0}';
const GEN_END: char = '\u{10FFF1}';

/// The variables a render sees beside the messages.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RenderVars {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub add_generation_prompt: bool,
    /// Tool schemas (JSON), as transformers passes `tools=`.
    pub tools: Option<serde_json::Value>,
    /// Retrieved documents (JSON), as transformers passes `documents=`.
    pub documents: Option<serde_json::Value>,
}

/// Rendered text and the byte ranges of its `{% generation %}` blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub text: String,
    pub generation: Vec<std::ops::Range<usize>>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The template's text as the model ships it.
    pub source: String,
    /// Where it came from (a file, a field, or a built-in name).
    pub origin: String,
    /// Whether it marks the assistant's text with `{% generation %}`.
    pub has_generation: bool,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `source`; a syntax error names `origin` and the line.
    /// `today` is the (year, month, day) `strftime_now` formats: a
    /// training job fixes it so its inputs do not change with the calendar.
    pub fn new(source: &str, origin: &str, today: Option<(i32, u32, u32)>) -> Result<Self> {
        let (rewritten, has_generation) = rewrite_generation_tags(source);
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", move |fmt: &str| -> Result<String, Error> {
            let (y, m, d, secs) = match today {
                Some((y, m, d)) => (y, m, d, 0),
                None => now_utc(),
            };
            strftime(fmt, y, m, d, secs).map_err(|e| Error::new(ErrorKind::InvalidOperation, e))
        });
        env.add_template_owned("chat", rewritten)
            .map_err(|e| template_error(origin, &e))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            origin: origin.to_string(),
            has_generation,
        })
    }

    /// Render `messages` (anything serializable as a list of maps with at
    /// least `role` and `content`) with `vars`.
    pub fn render<M: Serialize>(&self, messages: &M, vars: &RenderVars) -> Result<Rendered> {
        let tmpl = self
            .env
            .get_template("chat")
            .expect("added at construction");
        let ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            bos_token => &vars.bos_token,
            eos_token => &vars.eos_token,
            pad_token => &vars.pad_token,
            unk_token => &vars.unk_token,
            add_generation_prompt => vars.add_generation_prompt,
            tools => vars.tools.as_ref().map(|t| Value::from(minijinja::value::Serde(t))),
            documents => vars.documents.as_ref().map(|t| Value::from(minijinja::value::Serde(t))),
        };
        let raw = tmpl
            .render(ctx)
            .map_err(|e| template_error(&self.origin, &e))?;
        split_generation(raw).map_err(|why| EngineError::config(&self.origin, "chat_template", why))
    }
}

/// `{% generation %}` / `{% endgeneration %}` (a transformers extension) as
/// blocks that print a marker; trim markers (`-`) and the block-ness that
/// `trim_blocks`/`lstrip_blocks` act on are kept.
fn rewrite_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = &tag[2..tag.len() - 2];
        let lead = if inner.starts_with('-') { "-" } else { "" };
        let trail = if inner.ends_with('-') { "-" } else { "" };
        let word = inner.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        match word {
            "generation" | "endgeneration" => {
                let mark = if word == "generation" {
                    GEN_START
                } else {
                    GEN_END
                };
                found = true;
                out.push_str(&format!(
                    "{{%{lead} if true %}}{{{{ '{mark}' }}}}{{% endif {trail}%}}"
                ));
            }
            _ => out.push_str(tag),
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    (out, found)
}

/// Take the generation markers out of rendered text, keeping their spans.
fn split_generation(raw: String) -> std::result::Result<Rendered, String> {
    if !raw.contains([GEN_START, GEN_END]) {
        return Ok(Rendered {
            text: raw,
            generation: vec![],
        });
    }
    let mut text = String::with_capacity(raw.len());
    let mut generation = vec![];
    let mut open: Option<usize> = None;
    for c in raw.chars() {
        match c {
            GEN_START if open.is_none() => open = Some(text.len()),
            GEN_END => match open.take() {
                Some(s) => generation.push(s..text.len()),
                None => return Err("{% endgeneration %} without {% generation %}".into()),
            },
            GEN_START => return Err("nested {% generation %} blocks".into()),
            c => text.push(c),
        }
    }
    if open.is_some() {
        return Err("a {% generation %} block is never closed".into());
    }
    Ok(Rendered { text, generation })
}

/// A minijinja error as the template's own words, with its line.
fn template_error(origin: &str, e: &Error) -> EngineError {
    let mut reason = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some() => {
            e.detail().unwrap_or_default().to_string()
        }
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        reason = format!("{reason} (template line {line})");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason.push_str(&format!(": {s}"));
        source = s.source();
    }
    EngineError::config(origin, "chat_template", reason)
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`, not HTML-escaped.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() => None,
        Some(v) if v.kind() == ValueKind::Number => Some(" ".repeat(i64::try_from(v)? as usize)),
        Some(v) => Some(v.as_str().unwrap_or_default().to_string()),
    };
    let (item, key) = match separators {
        Some(s) if !s.is_none() => {
            let a: Vec<Value> = s.try_iter()?.collect();
            match a.as_slice() {
                [i, k] => (
                    i.as_str().unwrap_or(",").to_string(),
                    k.as_str().unwrap_or(":").to_string(),
                ),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let style = JsonStyle {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
    };
    dump(value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonStyle {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
}

fn dump(v: &Value, s: &JsonStyle, depth: usize, out: &mut String) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(ind) = &s.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if let Ok(i) = i64::try_from(v.clone()) {
                if v.as_i64().is_some() {
                    out.push_str(&i.to_string());
                    return Ok(());
                }
            }
            let f = f64::try_from(v.clone())?;
            out.push_str(&python_float(f));
        }
        ValueKind::String => json_string(v.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            out.push('[');
            for (i, x) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&s.item);
                }
                newline(out, depth + 1);
                dump(x, s, depth + 1, out)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if s.sort_keys {
                keys.sort_by_key(|a| a.to_string());
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&s.item);
                }
                newline(out, depth + 1);
                json_string(&k.to_string(), out);
                out.push_str(&s.key);
                dump(&v.get_item(k)?, s, depth + 1, out)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => json_string(&v.to_string(), out),
    }
    Ok(())
}

/// Python's `repr` of a float, as `json.dumps` writes it.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{f:?}");
    // Rust writes 1e20 as "1e20"; Python as "1e+20".
    match s.split_once('e') {
        Some((m, e)) if !e.starts_with('-') => format!("{m}e+{e}"),
        _ => s,
    }
}

/// A JSON string as `json.dumps(ensure_ascii=False)` writes it.
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Today's UTC date and seconds into the day.
fn now_utc() -> (i32, u32, u32, u32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    (y, m, d, secs.rem_euclid(86_400) as u32)
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i32, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y } as i32, m, d)
}

fn days_from_civil(y: i32, m: u32, d: u32) -> i64 {
    let y = i64::from(y) - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// C's `strftime` (C locale) for the directives dates are written with.
pub fn strftime(
    fmt: &str,
    y: i32,
    m: u32,
    d: u32,
    secs: u32,
) -> std::result::Result<String, String> {
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return Err(format!("strftime_now: invalid date {y}-{m}-{d}"));
    }
    let days = days_from_civil(y, m, d);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let yday = days - days_from_civil(y, 1, 1) + 1;
    let (hh, mm, ss) = (secs / 3600, secs / 60 % 60, secs % 60);
    let month = MONTHS[m as usize - 1];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('b') | Some('h') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('F') => out.push_str(&format!("{y}-{m:02}-{d:02}")),
            Some('%') => out.push('%'),
            Some(other) => return Err(format!("strftime_now: %{other} is not supported")),
            None => return Err("strftime_now: a format ends in a lone %".into()),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
