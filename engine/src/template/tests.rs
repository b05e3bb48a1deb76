//! The template engine against transformers' renders.

use super::*;

fn render(src: &str, msgs: serde_json::Value, gen: bool) -> Rendered {
    let t = ChatTemplate::new(src, "test", Some((2024, 7, 26))).unwrap();
    let vars = RenderVars {
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
        add_generation_prompt: gen,
        ..Default::default()
    };
    t.render(&msgs, &vars).unwrap()
}

#[test]
fn templates_are_found_where_transformers_looks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(find_in_dir(d).unwrap().is_none());
    let named = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
    std::fs::write(d.join("tokenizer_config.json"), named.to_string()).unwrap();
    let (text, origin) = find_in_dir(d).unwrap().unwrap();
    assert_eq!(text, "D");
    assert!(origin.contains("tokenizer_config.json") && origin.contains("default"));
    std::fs::write(d.join("chat_template.json"), r#"{"chat_template": "J"}"#).unwrap();
    assert_eq!(find_in_dir(d).unwrap().unwrap().0, "J");
    std::fs::write(d.join("chat_template.jinja"), "F").unwrap();
    assert_eq!(find_in_dir(d).unwrap().unwrap().0, "F");
    // A list without `default` is refused, naming the templates.
    let d2 = tempfile::tempdir().unwrap();
    let only = serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}]});
    std::fs::write(d2.path().join("tokenizer_config.json"), only.to_string()).unwrap();
    let e = find_in_dir(d2.path()).unwrap_err().to_string();
    assert!(e.contains("chat_template") && e.contains("tool_use"), "{e}");
}

#[test]
fn dates_format_as_c_strftime() {
    assert_eq!(strftime("%d %b %Y", 2024, 7, 26, 0).unwrap(), "26 Jul 2024");
    assert_eq!(
        strftime("%A %B %e %j", 2024, 7, 26, 0).unwrap(),
        "Friday July 26 208"
    );
    assert_eq!(civil_from_days(0), (1970, 1, 1));
    assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
    assert!(strftime("%Q", 2024, 1, 1, 0).is_err());
}

#[test]
fn python_methods_namespace_loop_controls_and_trim_blocks() {
    let src = "{% set ns = namespace(n=0) %}\n{% for m in messages %}\n{% if m.role == 'skip' %}{% continue %}{% endif %}\n{% set ns.n = ns.n + 1 %}\n{{ m['content'].strip().upper() }}|{{ m.content | trim }}\n{% endfor %}\n{{ ns.n }}{{ strftime_now('%d %b %Y') }}";
    let r = render(
        src,
        serde_json::json!([{"role": "user", "content": " hi "}, {"role": "skip", "content": "x"}]),
        false,
    );
    assert_eq!(r.text, "HI|hi\n126 Jul 2024");
}

#[test]
fn tojson_writes_pythons_json_dumps() {
    let t = ChatTemplate::new(
        "{{ messages[0] | tojson }}{{ messages[0] | tojson(indent=2) }}",
        "t",
        None,
    )
    .unwrap();
    let msgs = [crate::chat::Message::new("user", "a<b\n\"é\"")];
    let r = t.render(&msgs, &RenderVars::default()).unwrap();
    assert_eq!(
            r.text,
            "{\"role\": \"user\", \"content\": \"a<b\\n\\\"é\\\"\"}{\n  \"role\": \"user\",\n  \"content\": \"a<b\\n\\\"é\\\"\"\n}"
        );
}

#[test]
fn generation_blocks_give_spans_and_keep_whitespace_control() {
    let src = "{% for m in messages %}\n{% if m.role == 'assistant' %}\nA: {%- generation %} {{ m.content }}</s>{% endgeneration %}\n\n{% else %}\nU: {{ m.content }}\n{% endif %}\n{% endfor %}";
    let r = render(
        src,
        serde_json::json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
        false,
    );
    assert_eq!(r.text, "U: q\nA: a</s>\n");
    assert_eq!(&r.text[r.generation[0].clone()], " a</s>");
}

#[test]
fn raise_exception_and_syntax_errors_name_the_line() {
    let t = ChatTemplate::new(
        "a\n{{ raise_exception('roles must alternate') }}",
        "t.jinja",
        None,
    )
    .unwrap();
    let e = t
        .render(&serde_json::json!([]), &RenderVars::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("roles must alternate") && e.contains("line 2") && e.contains("t.jinja"),
        "{e}"
    );
    let e = ChatTemplate::new("ok\n{% for %}", "t.jinja", None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("line 2") && e.contains("t.jinja"), "{e}");
}
