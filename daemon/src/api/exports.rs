//! Exports in formats other than the recorded files: a checkpoint as one
//! GGUF file (llama.cpp, Ollama), converted here by the engine from the
//! verified blobs and streamed back. Nothing is recorded: an export is a
//! view of an artifact, and the same checkpoint and dtype give the same
//! bytes.

use std::path::PathBuf;

use super::*;

/// This resource's routes.
pub(super) fn routes(ctx: &Ctx) -> Vec<Route> {
    let c = with(ctx.clone());
    vec![warp::path!("artifacts" / String / "gguf")
        .and(warp::get())
        .and(c)
        .and(query())
        .and_then(get_gguf)
        .boxed()]
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct GgufQuery {
    /// `f16` (default) or `q8_0`.
    dtype: Option<String>,
}

async fn get_gguf(hash: String, ctx: Ctx, q: GgufQuery) -> Res {
    let dtype: herd_engine::gguf::GgufDtype = q
        .dtype
        .as_deref()
        .unwrap_or("f16")
        .parse()
        .map_err(|e: String| bad(format!("query `dtype`: {e}")))?;
    let artifact = super::artifacts::recorded_artifact(&ctx, &hash).await?;
    match artifact.artifact {
        ArtifactKind::Checkpoint => {}
        ArtifactKind::Adapter => {
            return Err(bad(format!(
                "{hash} is a LoRA adapter: GGUF holds whole models; merge it into its base first (`herd submit --kind merge --input model=BASE --input adapter={hash}`), then export the merged checkpoint"
            )))
        }
        other => {
            return Err(bad(format!(
                "{hash} is a {other}; only checkpoints export to GGUF"
            )))
        }
    }
    let state = ctx.state.clone();
    let work = state
        .data_dir
        .join("tmp")
        .join(format!("gguf-{}", Uuid::now_v7()));
    let w = work.clone();
    let converted = tokio::task::spawn_blocking(move || -> Result<PathBuf, String> {
        let dir = w.join("checkpoint");
        // Materialized from the verified blobs: a corrupt blob fails here.
        state
            .store
            .blobs
            .materialize(&hash, &dir)
            .map_err(|e| e.to_string())?;
        let out = w.join("model.gguf");
        herd_engine::gguf::write(&dir, &out, dtype)
            .map_err(|e| e.to_string().replace(&format!("{}/", dir.display()), ""))?;
        let _ = std::fs::remove_dir_all(&dir);
        Ok(out)
    })
    .await
    .map_err(internal)?;
    let out = match converted {
        Ok(out) => out,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(bad(format!("cannot export to GGUF: {e}")));
        }
    };
    let file = std::fs::File::open(&out).map_err(internal)?;
    let size = file.metadata().map_err(internal)?.len();
    // The file goes as soon as it is open: the stream reads the open handle.
    let _ = std::fs::remove_dir_all(&work);
    warp::http::Response::builder()
        .header("content-type", "application/octet-stream")
        .header("content-length", size)
        .body(stream_reader(file))
        .map_err(internal)
}
