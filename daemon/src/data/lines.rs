//! One JSONL line of each kind, read strictly: each reader returns the
//! example or the first problem as (field, reason); `data.rs` adds the file
//! and line and gathers the problems of a whole file.

use herd_engine::chat::{Message, ROLES};
use serde_json::Value;

use super::{PreferenceExample, PromptExample, SftExample, Strength};

type FieldResult<T> = Result<T, (String, String)>;

fn err<T>(field: &str, reason: impl Into<String>) -> FieldResult<T> {
    Err((field.to_string(), reason.into()))
}

fn messages(v: &Value, field: &str) -> FieldResult<Vec<Message>> {
    let arr = match v {
        Value::Array(a) => a,
        _ => return err(field, "expected a list of {role, content} messages"),
    };
    if arr.is_empty() {
        return err(field, "empty message list");
    }
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let f = format!("{field}[{i}]");
            let role = m
                .get("role")
                .and_then(|r| r.as_str())
                .ok_or((format!("{f}.role"), "missing or not a string".to_string()))?;
            if !ROLES.contains(&role) {
                return err(
                    &format!("{f}.role"),
                    format!("unknown role {role:?} (expected one of {ROLES:?})"),
                );
            }
            let content = m.get("content").and_then(|c| c.as_str()).ok_or((
                format!("{f}.content"),
                "missing or not a string".to_string(),
            ))?;
            let eom = match m.get("eom") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return err(&format!("{f}.eom"), "expected true or false"),
            };
            Ok(Message {
                role: role.to_string(),
                content: content.to_string(),
                eom,
            })
        })
        .collect()
}

/// A prompt: a string (one user turn) or a message list.
fn prompt(v: Option<&Value>, field: &str) -> FieldResult<Vec<Message>> {
    match v {
        None | Some(Value::Null) => err(field, "missing"),
        Some(Value::String(s)) if s.trim().is_empty() => err(field, "empty"),
        Some(Value::String(s)) => Ok(vec![Message::new("user", s)]),
        Some(other) => {
            let m = messages(other, field)?;
            if m.last().map(|x| x.role == "assistant").unwrap_or(false) {
                return err(field, "a prompt must not end with an assistant message");
            }
            Ok(m)
        }
    }
}

/// A response: a string, an assistant message, or a list of one.
fn response(v: Option<&Value>, field: &str) -> FieldResult<String> {
    let text = match v {
        None | Some(Value::Null) => return err(field, "missing"),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(_)) => {
            let m = messages(&Value::Array(vec![v.cloned().unwrap_or_default()]), field)?;
            if m[0].role != "assistant" {
                return err(
                    field,
                    format!("expected an assistant message, got role {:?}", m[0].role),
                );
            }
            m[0].content.clone()
        }
        Some(Value::Array(a)) if a.len() == 1 => {
            return response(a.first(), &format!("{field}[0]"))
        }
        Some(_) => return err(field, "expected a string or one assistant message"),
    };
    if text.trim().is_empty() {
        return err(field, "empty response");
    }
    Ok(text)
}

fn object(v: &Value) -> FieldResult<&serde_json::Map<String, Value>> {
    v.as_object()
        .ok_or(("(line)".to_string(), "expected a JSON object".to_string()))
}

/// The columns of a row that herd does not use.
pub(super) fn unused<'a>(o: &'a serde_json::Map<String, Value>, known: &[&str]) -> Vec<&'a str> {
    o.keys()
        .map(|k| k.as_str())
        .filter(|k| !known.contains(k))
        .collect()
}

/// Leading messages `a` and `b` share.
fn shared_prefix(a: &[Message], b: &[Message]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// HH-RLHF's text dialogs (`\n\nHuman: ...\n\nAssistant: ...`) as messages.
fn hh_dialog(s: &str) -> Option<Vec<Message>> {
    const MARKS: [(&str, &str); 2] = [("\n\nHuman:", "user"), ("\n\nAssistant:", "assistant")];
    if !s.contains(MARKS[0].0) || !s.contains(MARKS[1].0) {
        return None;
    }
    let mut out: Vec<Message> = vec![];
    let mut rest = s;
    let mut role: Option<&str> = None;
    loop {
        let next = MARKS
            .iter()
            .filter_map(|(m, r)| rest.find(m).map(|at| (at, *m, *r)))
            .min_by_key(|(at, _, _)| *at);
        let (text, after) = match next {
            Some((at, _, _)) => (&rest[..at], Some(next)),
            None => (rest, None),
        };
        if let Some(r) = role {
            out.push(Message::new(r, text.trim()));
        }
        match after.flatten() {
            Some((at, mark, r)) => {
                role = Some(r);
                rest = &rest[at + mark.len()..];
            }
            None => return Some(out),
        }
    }
}

/// `chosen`/`rejected` of an implicit-prompt row: a message list, or HH text.
fn dialog(v: Option<&Value>, field: &str) -> FieldResult<Vec<Message>> {
    match v {
        Some(Value::String(s)) => hh_dialog(s).ok_or((
            field.to_string(),
            "without `prompt`, expected a message list (or an HH-RLHF \"\\n\\nHuman: ... \\n\\nAssistant: ...\" dialog)".to_string(),
        )),
        Some(v @ Value::Array(_)) => messages(v, field),
        None | Some(Value::Null) => err(field, "missing"),
        Some(_) => err(field, "expected a message list"),
    }
}

/// One response after `prompt`: a string, one assistant message, or a
/// message list that repeats the prompt and then answers once.
fn response_after(prompt: &[Message], v: Option<&Value>, field: &str) -> FieldResult<String> {
    match v {
        Some(list @ Value::Array(a)) if a.len() > 1 => {
            let m = messages(list, field)?;
            let k = shared_prefix(&m, prompt);
            if k != prompt.len() {
                return err(
                    field,
                    format!("a message list that does not start with the prompt (they differ at message {k})"),
                );
            }
            final_turn(&m[k..], field, k)
        }
        other => response(other, field),
    }
}

/// What follows a prompt must be one assistant message.
fn final_turn(rest: &[Message], field: &str, at: usize) -> FieldResult<String> {
    match rest {
        [m] if m.role == "assistant" && !m.content.trim().is_empty() => Ok(m.content.clone()),
        [m] if m.role == "assistant" => err(&format!("{field}[{at}]"), "empty response"),
        [] => err(field, "no response after the prompt"),
        _ => err(
            &format!("{field}[{at}]"),
            format!(
                "{} messages after the prompt; herd ranks one final assistant turn (the shared messages before it are the prompt)",
                rest.len()
            ),
        ),
    }
}

pub(super) fn preference_line(v: &Value) -> FieldResult<PreferenceExample> {
    let o = object(v)?;
    let strength = match o.get("strength") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(
            Strength::ALL
                .into_iter()
                .find(|x| x.as_str() == s)
                .ok_or(("strength".to_string(), format!("{s:?} is not one of significantly_better, better, slightly_better, marginally_better")))?,
        ),
        Some(_) => return err("strength", "expected a string"),
    };
    if o.get("prompt").is_none() && o.get("responses").is_none() {
        // TRL's implicit prompt: what chosen and rejected share.
        let chosen = dialog(o.get("chosen"), "chosen")?;
        let rejected = dialog(o.get("rejected"), "rejected")?;
        let k = shared_prefix(&chosen, &rejected);
        if k == 0 || chosen[..k].last().is_some_and(|m| m.role == "assistant") {
            return err(
                "chosen",
                "chosen and rejected share no prompt (no leading messages ending before an assistant turn)",
            );
        }
        let responses = vec![
            final_turn(&chosen[k..], "chosen", k)?,
            final_turn(&rejected[k..], "rejected", k)?,
        ];
        return Ok(PreferenceExample {
            prompt: chosen[..k].to_vec(),
            responses,
            strength,
        });
    }
    let prompt = prompt(o.get("prompt"), "prompt")?;
    let responses = if let Some(r) = o.get("responses") {
        let arr = r.as_array().ok_or((
            "responses".to_string(),
            "expected a list, best first".to_string(),
        ))?;
        if !(2..=3).contains(&arr.len()) {
            return err(
                "responses",
                format!("expected 2 or 3 ranked responses, got {}", arr.len()),
            );
        }
        arr.iter()
            .enumerate()
            .map(|(i, x)| response_after(&prompt, Some(x), &format!("responses[{i}]")))
            .collect::<FieldResult<Vec<_>>>()?
    } else {
        let mut out = vec![];
        if let Some(e) = o.get("edited").filter(|e| !e.is_null()) {
            out.push(response_after(&prompt, Some(e), "edited")?);
        }
        out.push(response_after(&prompt, o.get("chosen"), "chosen")?);
        out.push(response_after(&prompt, o.get("rejected"), "rejected")?);
        out
    };
    Ok(PreferenceExample {
        prompt,
        responses,
        strength,
    })
}

pub(super) fn sft_line(v: &Value) -> FieldResult<SftExample> {
    let o = object(v)?;
    if let Some(t) = o.get("text") {
        return match t {
            Value::String(s) if !s.trim().is_empty() => Ok(SftExample {
                messages: vec![],
                text: Some(s.clone()),
            }),
            Value::String(_) => err("text", "empty"),
            _ => err("text", "expected a string"),
        };
    }
    if let Some(m) = o.get("messages") {
        let messages = messages(m, "messages")?;
        if messages
            .last()
            .map(|m| m.role != "assistant")
            .unwrap_or(true)
        {
            return err(
                "messages",
                "the last message must be the assistant's (it is what SFT trains on)",
            );
        }
        return Ok(SftExample::dialog(messages));
    }
    let mut messages = prompt(o.get("prompt"), "prompt")?;
    messages.push(Message::new(
        "assistant",
        &response(o.get("completion"), "completion")?,
    ));
    Ok(SftExample::dialog(messages))
}

pub(super) fn prompts_line(v: &Value) -> FieldResult<PromptExample> {
    let o = object(v)?;
    let prompt = match (o.get("prompt"), o.get("messages")) {
        (Some(p), None) => prompt(Some(p), "prompt")?,
        (None, Some(m)) => prompt(Some(m), "messages")?,
        (Some(_), Some(_)) => return err("prompt", "give either `prompt` or `messages`, not both"),
        (None, None) => return err("prompt", "missing (or `messages`)"),
    };
    let answer = match o.get("answer") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return err("answer", "expected a string or a number"),
    };
    let system = match o.get("system") {
        None | Some(Value::Null) => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                Value::String(s) => Ok(s.clone()),
                _ => err(&format!("system[{i}]"), "expected a string"),
            })
            .collect::<FieldResult<_>>()?,
        Some(_) => return err("system", "expected a string or a list of strings"),
    };
    if let Some(i) = system.iter().position(|s| s.trim().is_empty()) {
        return err(&format!("system[{i}]"), "empty system prompt");
    }
    if !system.is_empty() && prompt.first().is_some_and(|m| m.role == "system") {
        return err(
            "system",
            "the prompt already starts with a system message; give one or the other",
        );
    }
    Ok(PromptExample {
        prompt,
        answer,
        system,
    })
}
