//! `curate`: Llama 3's data cleaning (§4.2.3), each rule counted.
//!
//! 1. Rule-based: responses with too many emoji or exclamation marks go.
//! 2. Over-apologetic tone: responses with "I'm sorry"/"I apologize"-style
//!    phrases are kept to at most a set share of the result.
//! 3. Near-duplicates: MinHash over word shingles of the whole example (a
//!    preference row: its prompt and every response, since the same prompt
//!    and best answer against another rejected one is another comparison),
//!    candidates found by LSH banding (near-linear), each confirmed on the
//!    whole signature: the first of a group stays, as an all-pairs scan keeps.
//! 4. Preference data: pairs whose responses are too similar go.
//! 5. Quality (with an `rm` input): only the top fraction by RM score stays.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::generation::score;
use super::inputs::{chat_of, save_dataset, similarity};
use super::recipe::{Accepts, InputNames, JobContext, OutputKind, Recipe, Validate};
use crate::data::{self, Dataset, DatasetKind};
use herd_core::{ArtifactKind, JobKind};

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
    fn bounds() -> Vec<super::recipe::Bound> {
        [
            "apology_max_share",
            "dedup_threshold",
            "similar_response_threshold",
            "quality_top_fraction",
        ]
        .map(|n| super::recipe::Bound::closed(n, 0.0, 1.0))
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
pub fn minhash(text: &str) -> [u64; SLOTS] {
    let words: Vec<String> = text.split_whitespace().map(|w| w.to_lowercase()).collect();
    let shingles: Vec<String> = if words.len() < 3 {
        vec![words.join(" ")]
    } else {
        words.windows(3).map(|w| w.join(" ")).collect()
    };
    let mut sig = [u64::MAX; SLOTS];
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

/// Signature slots of each MinHash.
const SLOTS: usize = 64;

/// Which rows are near-duplicates of an earlier kept row: the row's
/// signature agrees with a kept one's on at least `threshold` of its slots.
/// Rows with `skip` set are neither checked nor kept. The all-pairs scan:
/// quadratic, the reference the banded index is tested against.
pub fn near_duplicates_exhaustive(
    sigs: &[[u64; SLOTS]],
    skip: &[bool],
    threshold: f64,
) -> Vec<bool> {
    let mut dup = vec![false; sigs.len()];
    let mut kept: Vec<usize> = vec![];
    for i in 0..sigs.len() {
        if skip[i] {
            continue;
        }
        if kept.iter().any(|j| agree(&sigs[i], &sigs[*j], threshold)) {
            dup[i] = true;
        } else {
            kept.push(i);
        }
    }
    dup
}

fn agree(a: &[u64; SLOTS], b: &[u64; SLOTS], threshold: f64) -> bool {
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / SLOTS as f64 >= threshold
}

/// Rows per band of the LSH index for `threshold`: the most (fewest
/// candidates) with which a pair whose true similarity is the threshold
/// shares a band with probability >= 0.999 (1 - (1 - t^r)^(64/r)); None
/// when even one-slot bands cannot promise that (thresholds under ~0.1).
fn rows_per_band(threshold: f64) -> Option<usize> {
    [16usize, 8, 4, 2, 1].into_iter().find(|r| {
        let bands = (SLOTS / r) as i32;
        1.0 - (1.0 - threshold.powi(*r as i32)).powi(bands) >= 0.999
    })
}

/// [`near_duplicates_exhaustive`]'s answer from a banded index: each kept
/// row is filed under each band's values; a row is compared in full only
/// with the kept rows it shares a band with. The same rows are kept except
/// where a pair at the threshold shares no band (probability < 0.001 there,
/// falling fast above it).
pub fn near_duplicates(sigs: &[[u64; SLOTS]], skip: &[bool], threshold: f64) -> Vec<bool> {
    let Some(r) = rows_per_band(threshold) else {
        return near_duplicates_exhaustive(sigs, skip, threshold);
    };
    let bands = SLOTS / r;
    // (band, hash of its values) -> kept rows. Lookups only ask "any?", so
    // the map's order never shows in the result.
    let mut index: std::collections::HashMap<(usize, u64), Vec<usize>> =
        std::collections::HashMap::new();
    let key = |sig: &[u64; SLOTS], b: usize| {
        let h = sig[b * r..(b + 1) * r]
            .iter()
            .fold(0x9E37_79B9_7F4A_7C15u64, |h, v| splitmix(h ^ v));
        (b, h)
    };
    let mut dup = vec![false; sigs.len()];
    for i in 0..sigs.len() {
        if skip[i] {
            continue;
        }
        let found = (0..bands).any(|b| {
            index
                .get(&key(&sigs[i], b))
                .is_some_and(|rows| rows.iter().any(|j| agree(&sigs[i], &sigs[*j], threshold)))
        });
        if found {
            dup[i] = true;
            continue;
        }
        for b in 0..bands {
            index.entry(key(&sigs[i], b)).or_default().push(i);
        }
    }
    dup
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
    const ACCEPTS: Accepts = &[("data", &[ArtifactKind::Sft, ArtifactKind::Preference])];
    fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
        run(ctx, p)
    }
}

fn run(ctx: &mut JobContext, p: Params) -> Result<Value> {
    let path = ctx.input("data")?.to_path_buf();
    let bytes = std::fs::read(&path)?;
    let file = path.display().to_string();
    let ds = data::parse_any(&[DatasetKind::Preference, DatasetKind::Sft], &bytes, &file)?;
    let views: Vec<View> = match &ds {
        Dataset::Preference(rows) => rows
            .iter()
            .map(|r| View {
                text: r
                    .prompt
                    .iter()
                    .map(|m| m.content.as_str())
                    .chain(r.responses.iter().map(|s| s.as_str()))
                    .collect::<Vec<_>>()
                    .join(" "),
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
    let sigs: Vec<[u64; SLOTS]> = views.iter().map(|v| minhash(&v.text)).collect();
    let skip: Vec<bool> = keep.iter().map(|k| !k).collect();
    let dup = near_duplicates(&sigs, &skip, p.dedup_threshold);
    let mut dropped = 0;
    for (k, d) in keep.iter_mut().zip(&dup) {
        if *d {
            *k = false;
            dropped += 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use herd_engine::rng::Rng;

    /// `n` documents of `words` random words each, and for every fifth one
    /// a near-copy later on (one word changed: 3-shingle similarity ~0.95
    /// for 120 words, far enough above 0.8 for a 64-slot estimate); returns the texts and the indexes of the planted copies.
    fn planted(n: usize, words: usize, seed: u64) -> (Vec<String>, Vec<usize>) {
        let mut rng = Rng::new(seed);
        let mut word = || format!("w{}", rng.below(5000));
        let mut texts: Vec<String> = (0..n)
            .map(|_| (0..words).map(|_| word()).collect::<Vec<_>>().join(" "))
            .collect();
        let mut copies = vec![];
        for i in (0..n).step_by(5) {
            let mut w: Vec<String> = texts[i].split(' ').map(String::from).collect();
            w[words / 2] = "changed".into();
            copies.push(texts.len());
            texts.push(w.join(" "));
        }
        (texts, copies)
    }

    #[test]
    fn lsh_finds_the_planted_near_duplicates_and_agrees_with_all_pairs() {
        let (texts, copies) = planted(2000, 120, 1);
        let sigs: Vec<_> = texts.iter().map(|t| minhash(t)).collect();
        let skip = vec![false; sigs.len()];
        for threshold in [0.5, 0.8, 0.9] {
            let fast = near_duplicates(&sigs, &skip, threshold);
            let slow = near_duplicates_exhaustive(&sigs, &skip, threshold);
            assert_eq!(fast, slow, "threshold {threshold}");
            let found: Vec<usize> = (0..fast.len()).filter(|i| fast[*i]).collect();
            if threshold <= 0.8 {
                assert_eq!(found, copies, "threshold {threshold}");
            }
        }
        // Skipped rows are neither checked nor kept: the originals skipped,
        // their copies stay.
        let mut skip = vec![false; sigs.len()];
        for i in (0..2000).step_by(5) {
            skip[i] = true;
        }
        assert!(near_duplicates(&sigs, &skip, 0.8).iter().all(|d| !d));
    }

    #[test]
    fn banding_promises_recall_at_the_threshold() {
        assert_eq!(rows_per_band(0.8), Some(4));
        assert_eq!(rows_per_band(0.5), Some(2));
        assert_eq!(rows_per_band(0.95), Some(8));
        // Low thresholds fall back to comparing all pairs (same answer).
        assert_eq!(rows_per_band(0.05), None);
        let (texts, _) = planted(200, 10, 2);
        let sigs: Vec<_> = texts.iter().map(|t| minhash(t)).collect();
        let skip = vec![false; sigs.len()];
        assert_eq!(
            near_duplicates(&sigs, &skip, 0.05),
            near_duplicates_exhaustive(&sigs, &skip, 0.05)
        );
    }
}
