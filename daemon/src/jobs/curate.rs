//! `curate`: Llama 3's data cleaning (§4.2.3), each rule counted.
//!
//! 1. Rule-based: responses with too many emoji or exclamation marks go.
//! 2. Over-apologetic tone: responses with "I'm sorry"/"I apologize"-style
//!    phrases are kept to at most a set share of the result.
//! 3. Near-duplicates: MinHash over word shingles of the whole example.
//! 4. Preference data: pairs whose responses are too similar go.
//! 5. Quality (with an `rm` input): only the top fraction by RM score stays.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::recipe::{InputNames, OutputKind, Recipe};
use super::{chat_of, save_dataset, score, similarity};
use super::{ArtifactKind, JobContext, JobKind, Validate};
use crate::data::{self, Dataset, DatasetKind};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Params {
    pub max_emoji: usize,
    pub max_exclamations: usize,
    /// Largest share of kept rows whose response apologizes.
    pub apology_max_share: f64,
    /// Estimated Jaccard similarity at which two examples are duplicates.
    pub dedup_threshold: f64,
    /// Preference pairs at least this similar (word Jaccard) are dropped.
    pub similar_response_threshold: f64,
    /// With an `rm` input: keep this top fraction by reward (Llama 3: top quartile).
    pub quality_top_fraction: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            max_emoji: 3,
            max_exclamations: 3,
            apology_max_share: 0.1,
            dedup_threshold: 0.8,
            similar_response_threshold: 0.95,
            quality_top_fraction: 0.25,
        }
    }
}

impl Validate for Params {
    fn validate(&self) -> Result<(), String> {
        for (n, v) in [
            ("apology_max_share", self.apology_max_share),
            ("dedup_threshold", self.dedup_threshold),
            (
                "similar_response_threshold",
                self.similar_response_threshold,
            ),
            ("quality_top_fraction", self.quality_top_fraction),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{n} must be in [0, 1]"));
            }
        }
        Ok(())
    }
    fn bounds() -> Vec<super::Bound> {
        [
            "apology_max_share",
            "dedup_threshold",
            "similar_response_threshold",
            "quality_top_fraction",
        ]
        .map(|n| super::Bound::closed(n, 0.0, 1.0))
        .into()
    }
}

const APOLOGIES: [&str; 5] = [
    "i'm sorry",
    "i am sorry",
    "i apologize",
    "my apologies",
    "apologies for",
];

pub fn is_emoji(c: char) -> bool {
    matches!(c as u32, 0x1F300..=0x1FAFF | 0x2600..=0x27BF | 0x1F000..=0x1F2FF)
}

pub fn apologizes(text: &str) -> bool {
    let t = text.to_lowercase().replace('\u{2019}', "'");
    APOLOGIES.iter().any(|a| t.contains(a))
}

/// 64-permutation MinHash of 3-word shingles (whole text if shorter).
fn minhash(text: &str) -> [u64; 64] {
    let words: Vec<String> = text.split_whitespace().map(|w| w.to_lowercase()).collect();
    let shingles: Vec<String> = if words.len() < 3 {
        vec![words.join(" ")]
    } else {
        words.windows(3).map(|w| w.join(" ")).collect()
    };
    let mut sig = [u64::MAX; 64];
    for s in shingles {
        let base = fnv(s.as_bytes());
        for (i, slot) in sig.iter_mut().enumerate() {
            let h = splitmix(base ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            *slot = (*slot).min(h);
        }
    }
    sig
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// One row's view for the rules: its full text and its (best) response.
struct View {
    text: String,
    response: String,
    prompt: Vec<herd_engine::chat::Message>,
    /// For preference rows: best and worst responses.
    pair: Option<(String, String)>,
}

/// The `curate` recipe.
pub struct Curate;

impl Recipe for Curate {
    type Params = Params;
    const KIND: JobKind = JobKind::Curate;
    const INPUTS: InputNames = InputNames::Named {
        required: &["data"],
        optional: &["rm"],
    };
    const OUTPUTS: &'static [(&'static str, OutputKind)] = &[("data", OutputKind::SameAs("data"))];
    fn accepts(input: &str) -> &'static [ArtifactKind] {
        match input {
            "data" => &[ArtifactKind::Sft, ArtifactKind::Preference],
            _ => &[ArtifactKind::Checkpoint],
        }
    }
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let path = ctx.input("data")?.to_path_buf();
    let bytes = std::fs::read(&path)?;
    let file = path.display().to_string();
    // Preference or SFT data: whichever parses.
    let ds = match data::parse_bytes(DatasetKind::Preference, &bytes, &file) {
        Ok(d) => d,
        Err(_) => data::parse_bytes(DatasetKind::Sft, &bytes, &file)?,
    };
    let views: Vec<View> = match &ds {
        Dataset::Preference(rows) => rows
            .iter()
            .map(|r| View {
                text: format!(
                    "{} {}",
                    r.prompt
                        .iter()
                        .map(|m| m.content.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                    r.responses[0]
                ),
                response: r.responses[0].clone(),
                prompt: r.prompt.clone(),
                pair: Some((
                    r.responses[0].clone(),
                    r.responses.last().cloned().unwrap_or_default(),
                )),
            })
            .collect(),
        Dataset::Sft(rows) => rows
            .iter()
            .map(|r| {
                if let Some(t) = &r.text {
                    // Plain text: all of it is the "response".
                    return View {
                        text: t.clone(),
                        response: t.clone(),
                        prompt: vec![],
                        pair: None,
                    };
                }
                let (last, prompt) = r
                    .messages
                    .split_last()
                    .expect("sft rows end with the assistant");
                View {
                    text: r
                        .messages
                        .iter()
                        .map(|m| m.content.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                    response: last.content.clone(),
                    prompt: prompt.to_vec(),
                    pair: None,
                }
            })
            .collect(),
        Dataset::Prompts(_) => anyhow::bail!("curate takes sft or preference data"),
    };
    let n = views.len();
    let mut keep = vec![true; n];
    let mut counts = serde_json::Map::new();
    let mut count = |name: &str, dropped: usize| {
        counts.insert(name.to_string(), dropped.into());
    };
    // 1. emoji / exclamation excess
    let mut dropped = 0;
    for (i, v) in views.iter().enumerate() {
        let emoji = v.response.chars().filter(|c| is_emoji(*c)).count();
        let bangs = v.response.chars().filter(|c| *c == '!').count();
        if emoji > p.max_emoji || bangs > p.max_exclamations {
            keep[i] = false;
            dropped += 1;
        }
    }
    count("emoji_or_exclamation", dropped);
    // 4. similar responses (preference data)
    let mut dropped = 0;
    for (i, v) in views.iter().enumerate() {
        if let (true, Some((a, b))) = (keep[i], &v.pair) {
            if similarity(a, b) >= p.similar_response_threshold {
                keep[i] = false;
                dropped += 1;
            }
        }
    }
    count("similar_responses", dropped);
    // 3. near-duplicates: first occurrence stays
    let sigs: Vec<[u64; 64]> = views.iter().map(|v| minhash(&v.text)).collect();
    let mut kept_sigs: Vec<usize> = vec![];
    let mut dropped = 0;
    for i in 0..n {
        if !keep[i] {
            continue;
        }
        let dup = kept_sigs.iter().any(|j| {
            let same = sigs[i]
                .iter()
                .zip(&sigs[*j])
                .filter(|(a, b)| a == b)
                .count();
            same as f64 / 64.0 >= p.dedup_threshold
        });
        if dup {
            keep[i] = false;
            dropped += 1;
        } else {
            kept_sigs.push(i);
        }
    }
    count("near_duplicate", dropped);
    // 2. apology share: keep the first apologetic rows up to the share.
    let sorry: Vec<usize> = (0..n)
        .filter(|i| keep[*i] && apologizes(&views[*i].response))
        .collect();
    let plain = (0..n).filter(|i| keep[*i]).count() - sorry.len();
    let allowed = if p.apology_max_share >= 1.0 {
        sorry.len()
    } else {
        ((p.apology_max_share / (1.0 - p.apology_max_share)) * plain as f64).floor() as usize
    };
    let mut dropped = 0;
    for i in sorry.into_iter().skip(allowed) {
        keep[i] = false;
        dropped += 1;
    }
    count("apology_excess", dropped);
    // 5. quality filter by RM score
    let mut dropped = 0;
    if let Some(rm_dir) = ctx.inputs.get("rm").cloned() {
        let rm = herd_engine::checkpoint::load_model(&rm_dir, &ctx.device)?;
        let chat = chat_of(&rm_dir)?;
        let mut scored: Vec<(usize, f32)> = vec![];
        for i in (0..n).filter(|i| keep[*i]) {
            let s = score(
                &rm,
                &chat,
                &views[i].prompt,
                std::slice::from_ref(&views[i].response),
            )?;
            scored.push((i, s[0]));
        }
        let k = ((scored.len() as f64 * p.quality_top_fraction).ceil() as usize)
            .max(1)
            .min(scored.len());
        let mut ranked = scored.clone();
        ranked.sort_by(|a, b| {
            b.1.partial_cmp(&a.1)
                .unwrap_or(std::cmp::Ordering::Equal)
                .then(a.0.cmp(&b.0))
        });
        for (i, _) in ranked.into_iter().skip(k) {
            keep[i] = false;
            dropped += 1;
        }
    }
    count("low_quality", dropped);
    let out = match ds {
        Dataset::Preference(rows) => Dataset::Preference(
            rows.into_iter()
                .zip(&keep)
                .filter(|x| *x.1)
                .map(|x| x.0)
                .collect(),
        ),
        Dataset::Sft(rows) => Dataset::Sft(
            rows.into_iter()
                .zip(&keep)
                .filter(|x| *x.1)
                .map(|x| x.0)
                .collect(),
        ),
        Dataset::Prompts(_) => unreachable!(),
    };
    let kept = out.len();
    let points: Vec<(String, f64)> = counts
        .iter()
        .map(|(k, v)| (format!("dropped_{k}"), v.as_f64().unwrap_or(0.0)))
        .chain([("kept".to_string(), kept as f64)])
        .collect();
    ctx.sink.metrics(0, &points)?;
    if kept == 0 {
        anyhow::bail!(
            "curation removed every row ({n} in): {}",
            Value::Object(counts)
        );
    }
    save_dataset(ctx, "data", &out)?;
    Ok(json!({"rows_in": n, "rows_out": kept, "dropped": counts}))
}
