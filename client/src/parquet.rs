//! Parquet datasets (what the Hugging Face hub serves; snappy, gzip or zstd)
//! read into the JSONL rows herd records: one JSON object per row, columns by name, nested
//! lists and structs as JSON arrays and objects (a `chosen` column of
//! `{role, content}` structs becomes a message list). The daemon only ever
//! sees JSONL, so the recorded dataset is the same whatever file it came
//! from; the conversion is deterministic (rows in file order, keys sorted).

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Value};

use crate::{ClientError, Result};

/// Whether `path` names a Parquet file (by its extension).
pub fn is_parquet(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// Every row of the file as a JSONL line.
pub fn to_jsonl(path: &Path) -> Result<Vec<u8>> {
    let bad = |e: &dyn std::fmt::Display| {
        ClientError::Usage(format!(
            "{}: not a readable Parquet file: {e}",
            path.display()
        ))
    };
    let file = std::fs::File::open(path).map_err(|e| ClientError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(&e))?;
    let mut out = Vec::new();
    for (i, row) in reader.get_row_iter(None).map_err(|e| bad(&e))?.enumerate() {
        let row = row.map_err(|e| bad(&format!("row {}: {e}", i + 1)))?;
        serde_json::to_writer(&mut out, &row_json(&row)).expect("JSON values serialize");
        out.push(b'\n');
    }
    Ok(out)
}

fn row_json(row: &Row) -> Value {
    Value::Object(
        row.get_column_iter()
            .map(|(name, field)| (name.clone(), field_json(field)))
            .collect::<Map<_, _>>(),
    )
}

fn field_json(f: &Field) -> Value {
    match f {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => (*x).into(),
        Field::Short(x) => (*x).into(),
        Field::Int(x) => (*x).into(),
        Field::Long(x) => (*x).into(),
        Field::UByte(x) => (*x).into(),
        Field::UShort(x) => (*x).into(),
        Field::UInt(x) => (*x).into(),
        Field::ULong(x) => (*x).into(),
        Field::Float(x) => {
            serde_json::Number::from_f64(*x as f64).map_or(Value::Null, Value::Number)
        }
        Field::Double(x) => serde_json::Number::from_f64(*x).map_or(Value::Null, Value::Number),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::String(format!("{f}")),
        },
        Field::Group(r) => row_json(r),
        Field::ListInternal(l) => Value::Array(l.elements().iter().map(field_json).collect()),
        Field::MapInternal(m) => Value::Object(
            m.entries()
                .iter()
                .map(|(k, v)| {
                    let key = match k {
                        Field::Str(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (key, field_json(v))
                })
                .collect(),
        ),
        // Dates, times, decimals, floats16: as parquet prints them.
        other => Value::String(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/parquet")
            .join(name)
    }

    #[test]
    fn ultrafeedback_rows_become_json_lines() {
        let jsonl = to_jsonl(&fixture("ultrafeedback.parquet")).unwrap();
        let rows: Vec<Value> = String::from_utf8(jsonl)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0]["prompt"], "What is 2+2?");
        assert_eq!(
            rows[0]["chosen"][1],
            serde_json::json!({"content": "4", "role": "assistant"})
        );
        assert_eq!(rows[2]["score_rejected"], 1.0);
        assert_eq!(rows[1]["prompt_id"], "id1");
    }

    #[test]
    fn zstd_prompts_with_a_null() {
        let jsonl = String::from_utf8(to_jsonl(&fixture("prompts-zstd.parquet")).unwrap()).unwrap();
        assert_eq!(
            jsonl,
            "{\"answer\":\"5\",\"prompt\":\"What is 2+3?\"}\n{\"answer\":null,\"prompt\":\"Name a colour.\"}\n"
        );
    }

    #[test]
    fn gzip_text_corpus_and_bad_files() {
        let jsonl = String::from_utf8(to_jsonl(&fixture("corpus.parquet")).unwrap()).unwrap();
        assert_eq!(
            jsonl,
            "{\"id\":1,\"text\":\"The quick brown fox.\"}\n{\"id\":2,\"text\":\"Jumps over the lazy dog.\"}\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.parquet");
        std::fs::write(&bad, b"not parquet at all").unwrap();
        let err = to_jsonl(&bad).unwrap_err().to_string();
        assert!(
            err.contains("bad.parquet") && err.contains("not a readable Parquet file"),
            "{err}"
        );
    }
}
